//! Unit tests of the catalog rules, on an in-memory catalog (no gRPC, no chunk files: the
//! chunk records are made as PutChunks makes them).

use sha2::{Digest as _, Sha256};

use super::*;
use crate::repo::CHUNK_SIZE;

fn cat() -> Catalog {
    Catalog::in_memory(Settings {
        default_image_quota: 3,
        recycle_bin_days: 7,
    })
    .unwrap()
}

fn alpha() -> Principal {
    Principal::Project("alpha".into())
}
fn beta() -> Principal {
    Principal::Project("beta".into())
}

fn meta(name: &str, tag: &str, size: u64) -> UploadMeta {
    UploadMeta {
        image_name: name.into(),
        tag: tag.into(),
        virtual_size: size,
        os_type: "linux".into(),
        ..Default::default()
    }
}

fn uref(up: &UploadRow) -> UploadRef {
    UploadRef {
        project: up.project.clone(),
        id: up.id.clone(),
    }
}

fn iref(v: &ImageView) -> ImageRef {
    ImageRef {
        project: v.image.project.clone(),
        id: v.image.id.clone(),
    }
}

/// A data chunk of `len` bytes filled with `fill` at `index`.
fn chunk(index: u64, fill: u8, len: usize) -> (DataChunk, Vec<u8>) {
    let data = vec![fill; len];
    let digest: Digest = Sha256::digest(&data).into();
    (
        DataChunk {
            index,
            digest,
            mask: u64::MAX,
        },
        data,
    )
}

/// Sends `chunks` over `up` (records only) and adds their entries.
fn send(c: &Catalog, who: &Principal, up: &UploadRow, chunks: &[(DataChunk, Vec<u8>)]) {
    let u = uref(up);
    let digests: Vec<Digest> = chunks.iter().map(|(e, _)| e.digest).collect();
    let missing = c.find_missing(who, &u, &digests).unwrap();
    for (e, data) in chunks {
        if missing.contains(&e.digest) {
            c.chunk_stored(&u, &e.digest, data.len() as u64).unwrap();
        }
    }
    let entries: Vec<DataChunk> = chunks.iter().map(|(e, _)| *e).collect();
    c.add_entries(who, &u, &entries).unwrap();
}

/// A whole capture of a 2-chunk disk with one data chunk filled with `fill`.
fn capture(
    c: &Catalog,
    who: &Principal,
    project: &str,
    name: &str,
    tag: &str,
    fill: u8,
) -> ImageView {
    let size = 2 * CHUNK_SIZE;
    let up = c
        .begin_upload(who, project, "", meta(name, tag, size))
        .unwrap();
    let ch = [chunk(1, fill, CHUNK_SIZE as usize)];
    send(c, who, &up, &ch);
    let digest = content_digest(size, &[ch[0].0]);
    c.commit(who, &uref(&up), &digest, |_| Ok(())).unwrap()
}

fn reason(e: &Error) -> String {
    e.facts().reason
}

#[test]
fn an_upload_goes_queued_saving_active() {
    let c = cat();
    let size = CHUNK_SIZE + 100;
    let up = c
        .begin_upload(&alpha(), "alpha", "r1", meta("web", "", size))
        .unwrap();
    assert_eq!(up.meta.tag, "latest");
    let r = ImageRef {
        project: "alpha".into(),
        id: up.image_id.clone(),
    };
    assert_eq!(
        c.get_image(&alpha(), &r).unwrap().image.state,
        State::Queued
    );
    let ch = [chunk(0, 1, CHUNK_SIZE as usize), chunk(1, 2, 100)];
    send(&c, &alpha(), &up, &ch);
    let img = c.get_image(&alpha(), &r).unwrap().image;
    assert_eq!(img.state, State::Saving);
    assert_eq!(img.display_name, "web:latest");
    let digest = content_digest(size, &[ch[0].0, ch[1].0]);
    let v = c.commit(&alpha(), &uref(&up), &digest, |_| Ok(())).unwrap();
    assert_eq!(v.image.state, State::Active);
    assert_eq!(v.image.content_digest, digest);
    assert_eq!(v.image.stored_size, CHUNK_SIZE + 100);
    assert_eq!(v.image.data_chunk_count, 2);
    // Committing again returns the image again.
    let again = c
        .commit(&alpha(), &uref(&up), &digest, |_| panic!("no second sync"))
        .unwrap();
    assert_eq!(again.image.id, v.image.id);
    assert_eq!(
        c.get_upload(&alpha(), &uref(&up)).unwrap().state,
        UploadState::Committed
    );
    let (_, entries) = c.manifest(&alpha(), &r).unwrap();
    assert_eq!(entries.len(), 2);
}

#[test]
fn an_import_is_importing_while_it_uploads() {
    let c = cat();
    let mut m = meta("iso", "v1", CHUNK_SIZE);
    m.import = true;
    let up = c.begin_upload(&alpha(), "alpha", "", m).unwrap();
    send(&c, &alpha(), &up, &[chunk(0, 9, CHUNK_SIZE as usize)]);
    let r = ImageRef {
        project: "alpha".into(),
        id: up.image_id,
    };
    assert_eq!(
        c.get_image(&alpha(), &r).unwrap().image.state,
        State::Importing
    );
}

#[test]
fn commit_checks_chunks_and_the_content_digest() {
    let c = cat();
    let size = 2 * CHUNK_SIZE;
    let up = c
        .begin_upload(&alpha(), "alpha", "", meta("db", "", size))
        .unwrap();
    let (e, _) = chunk(0, 5, CHUNK_SIZE as usize);
    c.add_entries(&alpha(), &uref(&up), &[e]).unwrap();
    let digest = content_digest(size, &[e]);
    let err = c
        .commit(&alpha(), &uref(&up), &digest, |_| Ok(()))
        .unwrap_err();
    assert_eq!(reason(&err), "CHUNK_MISSING");
    assert!(err.to_string().contains(&hex::encode(e.digest)), "{err}");
    c.chunk_stored(&uref(&up), &e.digest, CHUNK_SIZE).unwrap();
    let err = c
        .commit(&alpha(), &uref(&up), &"0".repeat(64), |_| Ok(()))
        .unwrap_err();
    assert_eq!(reason(&err), "CONTENT_DIGEST_MISMATCH");
    // A failed sync leaves the upload open.
    let err = c
        .commit(&alpha(), &uref(&up), &digest, |_| {
            Err(crate::error::internal("disk gone"))
        })
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Internal);
    assert_eq!(
        c.get_upload(&alpha(), &uref(&up)).unwrap().state,
        UploadState::Open
    );
    c.commit(&alpha(), &uref(&up), &digest, |_| Ok(())).unwrap();
}

#[test]
fn entries_are_idempotent_by_index_and_checked() {
    let c = cat();
    let up = c
        .begin_upload(&alpha(), "alpha", "", meta("x", "", CHUNK_SIZE))
        .unwrap();
    let (e, _) = chunk(0, 1, 10);
    assert_eq!(c.add_entries(&alpha(), &uref(&up), &[e]).unwrap(), 1);
    assert_eq!(c.add_entries(&alpha(), &uref(&up), &[e]).unwrap(), 1);
    let (other, _) = chunk(0, 2, 10);
    assert_eq!(
        reason(&c.add_entries(&alpha(), &uref(&up), &[other]).unwrap_err()),
        "ENTRY_CONFLICT"
    );
    let (far, _) = chunk(1, 2, 10);
    assert_eq!(
        reason(&c.add_entries(&alpha(), &uref(&up), &[far]).unwrap_err()),
        "INDEX_OUT_OF_RANGE"
    );
    // A chunk of the wrong length for its index is refused at commit.
    c.chunk_stored(&uref(&up), &e.digest, 10).unwrap();
    let err = c
        .commit(
            &alpha(),
            &uref(&up),
            &content_digest(CHUNK_SIZE, &[e]),
            |_| Ok(()),
        )
        .unwrap_err();
    assert_eq!(reason(&err), "CHUNK_SIZE_MISMATCH");
}

#[test]
fn the_same_request_id_resumes_the_same_upload() {
    let c = cat();
    let a = c
        .begin_upload(&alpha(), "alpha", "req-1", meta("web", "", CHUNK_SIZE))
        .unwrap();
    let (e, _) = chunk(0, 3, CHUNK_SIZE as usize);
    c.chunk_stored(&uref(&a), &e.digest, CHUNK_SIZE).unwrap();
    let b = c
        .begin_upload(&alpha(), "alpha", "req-1", meta("web", "", CHUNK_SIZE))
        .unwrap();
    assert_eq!(a.id, b.id);
    assert_eq!(b.chunks_received, 1);
    // Only what is missing is asked for again.
    let missing = c
        .find_missing(&alpha(), &uref(&b), &[e.digest, [1; 32]])
        .unwrap();
    assert_eq!(missing, [[1u8; 32]]);
    let err = c
        .begin_upload(&alpha(), "alpha", "req-1", meta("db", "", CHUNK_SIZE))
        .unwrap_err();
    assert_eq!(reason(&err), "REQUEST_ID_REUSED");
    // Another upload of the same name and tag meanwhile is refused, naming the open one.
    let err = c
        .begin_upload(&alpha(), "alpha", "req-2", meta("web", "", CHUNK_SIZE))
        .unwrap_err();
    assert_eq!(reason(&err), "UPLOAD_IN_PROGRESS");
    assert!(err.to_string().contains(&a.id), "{err}");
}

#[test]
fn recapturing_a_tag_replaces_its_version_and_keeps_the_id() {
    let c = cat();
    let first = capture(&c, &alpha(), "alpha", "web", "nightly", 1);
    let old_version = first.image.version_id.clone();
    let second = capture(&c, &alpha(), "alpha", "web", "nightly", 2);
    assert_eq!(first.image.id, second.image.id);
    assert_ne!(first.image.content_digest, second.image.content_digest);
    assert_ne!(old_version, second.image.version_id);
    assert!(second.image.update_time >= first.image.update_time);
    assert_eq!(second.image.state, State::Active);
    let (_, entries) = c.manifest(&alpha(), &iref(&second)).unwrap();
    assert_eq!(entries[0].digest, chunk(1, 2, CHUNK_SIZE as usize).0.digest);
    // The old version's entries are gone, so its chunk is collectable; the new one is not.
    let swept = c.take_sweepable(i64::MAX, 100).unwrap();
    assert_eq!(swept.len(), 1);
    assert_eq!(swept[0].0, chunk(1, 1, CHUNK_SIZE as usize).0.digest);
    // Another tag is another image; the quota counts both.
    let other = capture(&c, &alpha(), "alpha", "web", "stable", 1);
    assert_ne!(other.image.id, first.image.id);
    assert_eq!(c.quota(&alpha(), "alpha").unwrap().image_count, 2);
}

#[test]
fn a_recapture_keeps_serving_the_old_version_until_commit_and_abort_keeps_it() {
    let c = cat();
    let first = capture(&c, &alpha(), "alpha", "web", "", 1);
    let up = c
        .begin_upload(&alpha(), "alpha", "", meta("web", "", 2 * CHUNK_SIZE))
        .unwrap();
    send(&c, &alpha(), &up, &[chunk(1, 7, CHUNK_SIZE as usize)]);
    let now = c.get_image(&alpha(), &iref(&first)).unwrap();
    assert_eq!(now.image.state, State::Active);
    assert_eq!(now.image.content_digest, first.image.content_digest);
    c.abort_upload(&alpha(), &uref(&up), "agent gave up")
        .unwrap();
    let now = c.get_image(&alpha(), &iref(&first)).unwrap();
    assert_eq!(now.image.state, State::Active);
    assert_eq!(now.image.failure_reason, "");
}

#[test]
fn abort_fails_the_record_with_the_reason_or_drops_it_and_a_failed_one_is_retried() {
    let c = cat();
    let up = c
        .begin_upload(&alpha(), "alpha", "", meta("a", "", CHUNK_SIZE))
        .unwrap();
    let r = ImageRef {
        project: "alpha".into(),
        id: up.image_id.clone(),
    };
    c.abort_upload(&alpha(), &uref(&up), "guest agent hung")
        .unwrap();
    let img = c.get_image(&alpha(), &r).unwrap().image;
    assert_eq!(img.state, State::Failed);
    assert_eq!(img.failure_reason, "guest agent hung");
    // Retrying the name reuses the failed record.
    let again = c
        .begin_upload(&alpha(), "alpha", "", meta("a", "", CHUNK_SIZE))
        .unwrap();
    assert_eq!(again.image_id, up.image_id);
    assert_eq!(
        c.get_image(&alpha(), &r).unwrap().image.state,
        State::Queued
    );
    let b = c
        .begin_upload(&alpha(), "alpha", "", meta("b", "", CHUNK_SIZE))
        .unwrap();
    c.abort_upload(&alpha(), &uref(&b), "").unwrap();
    let gone = ImageRef {
        project: "alpha".into(),
        id: b.image_id,
    };
    assert_eq!(
        c.get_image(&alpha(), &gone).unwrap_err().kind(),
        ErrorKind::NotFound
    );
}

#[test]
fn names_and_descriptions_change_in_any_state() {
    let c = cat();
    let up = c
        .begin_upload(&alpha(), "alpha", "", meta("a", "", CHUNK_SIZE))
        .unwrap();
    let r = ImageRef {
        project: "alpha".into(),
        id: up.image_id,
    };
    let v = c
        .update_image(
            &alpha(),
            &r,
            Some("Web server"),
            Some("nginx on debian"),
            None,
        )
        .unwrap();
    assert_eq!(v.image.state, State::Queued);
    assert_eq!(v.image.display_name, "Web server");
    assert_eq!(v.image.description, "nginx on debian");
    assert_eq!(
        reason(
            &c.update_image(&alpha(), &r, None, None, Some(true))
                .unwrap_err()
        ),
        "ADMIN_ONLY"
    );
    assert!(
        c.update_image(&Principal::Admin, &r, None, None, Some(true))
            .unwrap()
            .image
            .licensed
    );
}

#[test]
fn quota_counts_private_non_deleted_images() {
    let c = cat();
    let imgs: Vec<_> = (0..3)
        .map(|i| capture(&c, &alpha(), "alpha", &format!("i{i}"), "", i))
        .collect();
    let err = c
        .begin_upload(&alpha(), "alpha", "", meta("i3", "", CHUNK_SIZE))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ResourceExhausted);
    assert_eq!(reason(&err), "QUOTA_EXCEEDED");
    assert!(err.to_string().contains("quota is 3"), "{err}");
    // A recapture of an existing name is no new record.
    capture(&c, &alpha(), "alpha", "i0", "", 9);
    // The recycle bin does not count.
    c.delete_image(&alpha(), &iref(&imgs[0])).unwrap();
    capture(&c, &alpha(), "alpha", "i3", "", 3);
    // ...but restoring needs room.
    assert_eq!(
        reason(&c.undelete_image(&alpha(), &iref(&imgs[0])).unwrap_err()),
        "QUOTA_EXCEEDED"
    );
    assert_eq!(
        reason(&c.set_quota(&alpha(), "alpha", 100).unwrap_err()),
        "ADMIN_ONLY"
    );
    let q = c.set_quota(&Principal::Admin, "alpha", 4).unwrap();
    assert_eq!((q.image_limit, q.image_count), (4, 3));
    c.undelete_image(&alpha(), &iref(&imgs[0])).unwrap();
    assert_eq!(c.quota(&alpha(), "alpha").unwrap().image_count, 4);
    assert_eq!(
        reason(&c.quota(&beta(), "alpha").unwrap_err()),
        "OTHER_PROJECT"
    );
}

#[test]
fn the_recycle_bin_deletes_restores_and_purges() {
    let c = cat();
    let v = capture(&c, &alpha(), "alpha", "web", "", 1);
    let r = iref(&v);
    let d = c.delete_image(&alpha(), &r).unwrap();
    assert_eq!(d.image.state, State::Deleted);
    assert_eq!(d.image.deleted_from, Some(State::Active));
    assert_eq!(d.image.purge_time, d.image.delete_time + 7 * 86400);
    assert_eq!(
        reason(&c.delete_image(&alpha(), &r).unwrap_err()),
        "IMAGE_DELETED"
    );
    // Hidden from lists unless asked for.
    let q = ListQuery {
        parent: "projects/alpha".into(),
        ..Default::default()
    };
    assert!(c.list_images(&alpha(), &q).unwrap().0.is_empty());
    let bin = ListQuery {
        parent: "projects/alpha".into(),
        filter: "state = \"DELETED\"".into(),
        ..Default::default()
    };
    assert_eq!(c.list_images(&alpha(), &bin).unwrap().0.len(), 1);
    let u = c.undelete_image(&alpha(), &r).unwrap();
    assert_eq!(u.image.state, State::Active);
    assert_eq!(u.image.purge_time, 0);
    assert_eq!(
        reason(&c.purge_image(&alpha(), &r).unwrap_err()),
        "IMAGE_NOT_DELETED"
    );
    c.delete_image(&alpha(), &r).unwrap();
    c.purge_image(&alpha(), &r).unwrap();
    assert_eq!(
        c.get_image(&alpha(), &r).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    // The retention empties the bin.
    let w = capture(&c, &alpha(), "alpha", "db", "", 2);
    let d = c.delete_image(&alpha(), &iref(&w)).unwrap();
    assert_eq!(c.purge_expired(d.image.purge_time - 1).unwrap(), 0);
    assert_eq!(c.purge_expired(d.image.purge_time).unwrap(), 1);
    assert!(c.get_image(&alpha(), &iref(&w)).is_err());
}

#[test]
fn delete_is_refused_while_uploading_or_in_use_naming_the_user() {
    let c = cat();
    let up = c
        .begin_upload(&alpha(), "alpha", "", meta("a", "", CHUNK_SIZE))
        .unwrap();
    let r = ImageRef {
        project: "alpha".into(),
        id: up.image_id.clone(),
    };
    assert_eq!(
        reason(&c.delete_image(&alpha(), &r).unwrap_err()),
        "IMAGE_UPLOADING"
    );
    let v = capture(&c, &alpha(), "alpha", "web", "", 1);
    c.mark_in_use(&alpha(), &iref(&v), "domains/web1@host3")
        .unwrap();
    let err = c.delete_image(&alpha(), &iref(&v)).unwrap_err();
    assert_eq!(reason(&err), "IMAGE_IN_USE");
    assert!(err.to_string().contains("domains/web1@host3"), "{err}");
    // Batch-style: one refusal does not stop another delete.
    let other = capture(&c, &alpha(), "alpha", "db", "", 2);
    c.delete_image(&alpha(), &iref(&other)).unwrap();
    c.clear_in_use(&alpha(), &iref(&v)).unwrap();
    c.delete_image(&alpha(), &iref(&v)).unwrap();
    // A recapture under way blocks the delete of an ACTIVE image too.
    c.undelete_image(&alpha(), &iref(&v)).unwrap();
    c.begin_upload(&alpha(), "alpha", "", meta("web", "", 2 * CHUNK_SIZE))
        .unwrap();
    assert_eq!(
        reason(&c.delete_image(&alpha(), &iref(&v)).unwrap_err()),
        "IMAGE_UPLOADING"
    );
}

#[test]
fn lists_filter_and_page_with_opaque_tokens() {
    let c = cat();
    c.set_quota(&Principal::Admin, "alpha", 100).unwrap();
    for i in 0..5 {
        capture(
            &c,
            &alpha(),
            "alpha",
            &format!("img{i}"),
            if i % 2 == 0 { "even" } else { "odd" },
            i,
        );
    }
    capture(&c, &beta(), "beta", "theirs", "", 1);
    let mut q = ListQuery {
        parent: "projects/alpha".into(),
        page_size: 2,
        ..Default::default()
    };
    let mut seen = Vec::new();
    loop {
        let (page, next) = c.list_images(&alpha(), &q).unwrap();
        assert!(page.len() <= 2);
        seen.extend(page.into_iter().map(|v| v.image.image_name));
        if next.is_empty() {
            break;
        }
        q.page_token = next;
    }
    assert_eq!(seen, ["img4", "img3", "img2", "img1", "img0"]);
    let q = ListQuery {
        parent: "projects/-".into(),
        filter: "tag = \"even\" AND os_type = \"linux\"".into(),
        page_size: 1,
        ..Default::default()
    };
    let (page, next) = c.list_images(&alpha(), &q).unwrap();
    assert_eq!(page[0].image.image_name, "img4");
    let changed = ListQuery {
        filter: "tag = \"odd\"".into(),
        page_token: next,
        ..q.clone()
    };
    assert_eq!(
        reason(&c.list_images(&alpha(), &changed).unwrap_err()),
        "BAD_PAGE_TOKEN"
    );
    // A project lists only its own; another parent is refused; an admin sees all.
    let other = ListQuery {
        parent: "projects/beta".into(),
        ..Default::default()
    };
    assert_eq!(
        reason(&c.list_images(&alpha(), &other).unwrap_err()),
        "OTHER_PROJECT"
    );
    let all = ListQuery {
        parent: "projects/-".into(),
        ..Default::default()
    };
    assert_eq!(c.list_images(&alpha(), &all).unwrap().0.len(), 5);
    assert_eq!(c.list_images(&Principal::Admin, &all).unwrap().0.len(), 6);
    assert_eq!(c.list_images(&Principal::Admin, &other).unwrap().0.len(), 1);
}

#[test]
fn sharing_follows_accept_and_reject_and_members_cannot_act_as_owner() {
    let c = cat();
    let v = capture(&c, &alpha(), "alpha", "web", "", 1);
    let r = iref(&v);
    // Before sharing: beta may not see it.
    let err = c.get_image(&beta(), &r).unwrap_err();
    assert_eq!(
        (err.kind(), reason(&err)),
        (ErrorKind::PermissionDenied, "IMAGE_NOT_VISIBLE".into())
    );
    assert_eq!(
        reason(&c.add_member(&beta(), &r, "beta").unwrap_err()),
        "IMAGE_NOT_VISIBLE"
    );
    let m = c.add_member(&alpha(), &r, "beta").unwrap();
    assert_eq!(m.state, MemberState::Pending);
    assert_eq!(m.name(), format!("{}/members/beta", r.name()));
    // Pending: listed, prefixed by the owner, not usable.
    let all = ListQuery {
        parent: "projects/beta".into(),
        ..Default::default()
    };
    let (page, _) = c.list_images(&beta(), &all).unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].display_name(), "alpha/web:latest");
    assert_eq!(page[0].membership, Some(MemberState::Pending));
    assert_eq!(
        reason(&c.manifest(&beta(), &r).unwrap_err()),
        "SHARE_NOT_ACCEPTED"
    );
    // Only the member answers for itself.
    assert_eq!(
        reason(
            &c.update_membership(
                &Principal::Project("gamma".into()),
                &r,
                "beta",
                MemberState::Accepted
            )
            .unwrap_err()
        ),
        "NOT_MEMBER"
    );
    c.update_membership(&beta(), &r, "beta", MemberState::Accepted)
        .unwrap();
    assert_eq!(c.manifest(&beta(), &r).unwrap().1.len(), 1);
    // A member acting as owner.
    for err in [
        c.delete_image(&beta(), &r).unwrap_err(),
        c.update_image(&beta(), &r, Some("mine"), None, None)
            .unwrap_err(),
        c.add_member(&beta(), &r, "gamma").unwrap_err(),
        c.remove_member(&beta(), &r, "beta").unwrap_err(),
    ] {
        assert_eq!(
            (err.kind(), reason(&err)),
            (ErrorKind::PermissionDenied, "NOT_OWNER".into())
        );
    }
    // Reject: gone from the list; accept again later.
    c.update_membership(&beta(), &r, "beta", MemberState::Rejected)
        .unwrap();
    assert!(c.list_images(&beta(), &all).unwrap().0.is_empty());
    assert_eq!(
        reason(&c.manifest(&beta(), &r).unwrap_err()),
        "SHARE_NOT_ACCEPTED"
    );
    c.update_membership(&beta(), &r, "beta", MemberState::Accepted)
        .unwrap();
    assert_eq!(c.list_images(&beta(), &all).unwrap().0.len(), 1);
    // Shared images do not count against the member's quota.
    assert_eq!(c.quota(&beta(), "beta").unwrap().image_count, 0);
    // The owner stops sharing.
    c.remove_member(&alpha(), &r, "beta").unwrap();
    assert_eq!(
        reason(&c.get_image(&beta(), &r).unwrap_err()),
        "IMAGE_NOT_VISIBLE"
    );
}

#[test]
fn licensed_images_cannot_be_shared_and_members_are_limited_to_128() {
    let c = cat();
    let v = capture(&c, &alpha(), "alpha", "web", "", 1);
    let r = iref(&v);
    for i in 0..MAX_MEMBERS {
        c.add_member(&alpha(), &r, &format!("p{i}")).unwrap();
    }
    // Adding a member again is no new member.
    c.add_member(&alpha(), &r, "p0").unwrap();
    let err = c.add_member(&alpha(), &r, "p128").unwrap_err();
    assert_eq!(
        (err.kind(), reason(&err)),
        (ErrorKind::ResourceExhausted, "MEMBER_LIMIT".into())
    );
    let (page, next) = c.list_members(&alpha(), &r, 100, "").unwrap();
    assert_eq!(page.len(), 100);
    let (rest, end) = c.list_members(&alpha(), &r, 100, &next).unwrap();
    assert_eq!((rest.len(), end.as_str()), (28, ""));

    let mut m = meta("win", "", CHUNK_SIZE);
    m.licensed = true;
    let up = c.begin_upload(&alpha(), "alpha", "", m).unwrap();
    let lr = ImageRef {
        project: "alpha".into(),
        id: up.image_id,
    };
    let err = c.add_member(&alpha(), &lr, "beta").unwrap_err();
    assert_eq!(
        (err.kind(), reason(&err)),
        (ErrorKind::FailedPrecondition, "IMAGE_LICENSED".into())
    );
    // Marking a shared image licensed is refused while it has members.
    assert_eq!(
        reason(
            &c.update_image(&Principal::Admin, &r, None, None, Some(true))
                .unwrap_err()
        ),
        "IMAGE_SHARED"
    );
}

#[test]
fn a_project_cannot_touch_another_projects_uploads_or_images() {
    let c = cat();
    let up = c
        .begin_upload(&alpha(), "alpha", "", meta("a", "", CHUNK_SIZE))
        .unwrap();
    assert_eq!(
        reason(&c.find_missing(&beta(), &uref(&up), &[]).unwrap_err()),
        "OTHER_PROJECT"
    );
    assert_eq!(
        reason(
            &c.begin_upload(&beta(), "alpha", "", meta("b", "", CHUNK_SIZE))
                .unwrap_err()
        ),
        "OTHER_PROJECT"
    );
    let v = capture(&c, &alpha(), "alpha", "web", "", 1);
    let d = v.image.version_id.clone();
    assert!(!d.is_empty());
    let digest = chunk(1, 1, CHUNK_SIZE as usize).0.digest;
    assert_eq!(
        reason(&c.may_read_chunk(&beta(), &iref(&v), &digest).unwrap_err()),
        "IMAGE_NOT_VISIBLE"
    );
    c.may_read_chunk(&alpha(), &iref(&v), &digest).unwrap();
    // A chunk not in the image is refused the same way whether it exists or not.
    assert_eq!(
        reason(&c.may_read_chunk(&alpha(), &iref(&v), &[3; 32]).unwrap_err()),
        "CHUNK_NOT_READABLE"
    );
    // The admin sees everything.
    c.get_image(&Principal::Admin, &iref(&v)).unwrap();
}

#[test]
fn the_collector_keeps_referenced_held_and_young_chunks() {
    let c = cat();
    let v = capture(&c, &alpha(), "alpha", "web", "", 1);
    let up = c
        .begin_upload(&alpha(), "alpha", "", meta("new", "", CHUNK_SIZE))
        .unwrap();
    let (sent, _) = chunk(0, 8, CHUNK_SIZE as usize);
    c.chunk_stored(&uref(&up), &sent.digest, CHUNK_SIZE)
        .unwrap();
    // Referenced by the image, held by the open upload: nothing to sweep.
    assert!(c.take_sweepable(i64::MAX, 100).unwrap().is_empty());
    // The upload ends: its chunk goes, but only once older than the cutoff.
    c.abort_upload(&alpha(), &uref(&up), "").unwrap();
    assert!(c.take_sweepable(0, 100).unwrap().is_empty());
    let swept = c.take_sweepable(i64::MAX, 100).unwrap();
    assert_eq!(swept, [(sent.digest, CHUNK_SIZE)]);
    assert!(!c.chunk_known(&sent.digest).unwrap());
    // Purging the image frees its chunk.
    c.delete_image(&alpha(), &iref(&v)).unwrap();
    assert!(c.take_sweepable(i64::MAX, 100).unwrap().is_empty());
    c.purge_image(&alpha(), &iref(&v)).unwrap();
    assert_eq!(c.take_sweepable(i64::MAX, 100).unwrap().len(), 1);
}

#[test]
fn idle_uploads_are_aborted_and_their_records_fail() {
    let c = cat();
    let up = c
        .begin_upload(&alpha(), "alpha", "", meta("a", "", CHUNK_SIZE))
        .unwrap();
    let t = up.update_time;
    assert_eq!(c.abort_idle_uploads(t + 10, 60).unwrap(), 0);
    assert_eq!(c.abort_idle_uploads(t + 61, 60).unwrap(), 1);
    let img = c
        .get_image(
            &alpha(),
            &ImageRef {
                project: "alpha".into(),
                id: up.image_id.clone(),
            },
        )
        .unwrap()
        .image;
    assert_eq!(img.state, State::Failed);
    assert!(
        img.failure_reason.contains("idle"),
        "{}",
        img.failure_reason
    );
    assert_eq!(
        c.get_upload(&alpha(), &uref(&up)).unwrap().state,
        UploadState::Aborted
    );
}

#[test]
fn the_schema_is_versioned_and_reopening_migrates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("catalog.db");
    let s = Settings {
        default_image_quota: 10,
        recycle_bin_days: 7,
    };
    let v = {
        let c = Catalog::open(&p, s).unwrap();
        capture(&c, &alpha(), "alpha", "web", "", 1)
    };
    let c = Catalog::open(&p, s).unwrap();
    assert_eq!(c.get_image(&alpha(), &iref(&v)).unwrap().image, v.image);
    let conn = rusqlite::Connection::open(&p).unwrap();
    let n: i64 = conn
        .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, schema::latest());
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

#[test]
fn restoring_is_refused_when_a_newer_image_took_the_name() {
    let c = cat();
    let old = capture(&c, &alpha(), "alpha", "web", "", 1);
    c.delete_image(&alpha(), &iref(&old)).unwrap();
    let new = capture(&c, &alpha(), "alpha", "web", "", 2);
    assert_ne!(new.image.id, old.image.id);
    let err = c.undelete_image(&alpha(), &iref(&old)).unwrap_err();
    assert_eq!(
        (err.kind(), reason(&err)),
        (ErrorKind::AlreadyExists, "IMAGE_NAME_TAKEN".into())
    );
    assert!(err.to_string().contains(&new.image.id), "{err}");
}

#[test]
fn resource_names_parse_strictly() {
    let r = ImageRef::parse("projects/alpha/images/abc", "name").unwrap();
    assert_eq!((r.project.as_str(), r.id.as_str()), ("alpha", "abc"));
    assert_eq!(r.name(), "projects/alpha/images/abc");
    for bad in [
        "",
        "projects/alpha",
        "projects//images/x",
        "images/x",
        "projects/a/images/x/y",
    ] {
        assert_eq!(
            reason(&ImageRef::parse(bad, "name").unwrap_err()),
            "BAD_NAME",
            "{bad}"
        );
    }
    assert!(UploadRef::parse("projects/a/uploads/up-1", "upload").is_ok());
    assert!(UploadRef::parse("projects/a/images/up-1", "upload").is_err());
    assert_eq!(parse_parent("projects/-", true).unwrap(), None);
    assert!(parse_parent("projects/-", false).is_err());
    assert_eq!(
        parse_parent("projects/alpha", false).unwrap().as_deref(),
        Some("alpha")
    );
    assert!(parse_parent("projects/Alpha", false).is_err());
}
