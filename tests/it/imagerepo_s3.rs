//! The repository's S3 chunk store (`imagerepo::chunks_s3`) against the real S3 server of the
//! tests (s3s-fs, tests/servers/s3.sh): chunks stored, found, read, listed for the collector
//! and removed; a damaged object and a wrong key are errors that name the object or bucket; and
//! the real `imagerepo` binary with `[chunks] backend = "s3"`: the chunk protocol end to end,
//! dedup, read back and the collector, with every chunk in the bucket.

use std::time::{Duration, SystemTime};

use imaged::error::ErrorKind;
use imaged::imagerepo::chunks::ChunkStore;
use imaged::imagerepo::chunks_s3::{S3Chunks, S3ChunksConfig};
use sha2::{Digest as _, Sha256};

use crate::support::repo_server::{begin, finish, read_chunk, RepoServer, TestChunk};
use crate::support::servers::{S3, S3_LOCK};
use imaged::proto::imagerepo::v1 as pb;

fn store(rt: &tokio::runtime::Runtime, prefix: &str, secret: &str) -> S3Chunks {
    let s = S3::get();
    let cfg: S3ChunksConfig = toml::from_str(&format!(
        "endpoint = {:?}\nbucket = {:?}\naccess_key = {:?}\nsecret_key = {:?}\nprefix = {:?}\n",
        s.endpoint, s.bucket, s.access_key, secret, prefix
    ))
    .unwrap();
    S3Chunks::new(&cfg, rt.handle().clone()).unwrap()
}

fn chunk(seed: u8, len: usize) -> (imaged::repo::Digest, Vec<u8>) {
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(seed) ^ seed)
        .collect();
    (Sha256::digest(&data).into(), data)
}

#[test]
fn chunks_live_in_the_bucket_and_a_damaged_one_is_never_served() {
    let _l = S3_LOCK.blocking_read();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // A prefix of this run's own: the bucket outlives runs and other tests use it.
    let prefix = format!("imagerepo-test-{}/", std::process::id());
    let s = store(&rt, &prefix, &S3::get().secret_key);
    s.check().expect("the bucket answers");
    let before = SystemTime::now() - Duration::from_secs(120);

    let (d1, c1) = chunk(7, 4 << 20);
    let (d2, c2) = chunk(9, 12_345);
    assert!(!s.has(&d1).unwrap());
    assert!(s.put(&d1, &c1).unwrap());
    assert!(s.put(&d2, &c2).unwrap());
    assert!(s.has(&d1).unwrap() && s.has(&d2).unwrap());
    let mut buf = Vec::new();
    s.read(&d1, &mut buf).unwrap();
    assert!(buf == c1, "chunk 1 read back differs");
    s.read(&d2, &mut buf).unwrap();
    assert!(buf == c2, "chunk 2 read back differs");

    // Bytes that do not hash to their digest are refused before anything is sent.
    let e = s.put(&d1, &c2).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert_eq!(e.facts().reason, "DIGEST_MISMATCH");

    let mut listed = s.list().unwrap();
    listed.sort();
    let digests: Vec<_> = listed.iter().map(|(d, _)| *d).collect();
    let mut want = vec![d1, d2];
    want.sort();
    assert_eq!(
        digests, want,
        "the collector sees exactly this run's chunks"
    );
    for (_, when) in &listed {
        assert!(
            *when > before,
            "stored {when:?}: the listing's times are wrong"
        );
    }

    // An object changed behind the store's back is an error naming it, not image bytes.
    let h = hex::encode(d2);
    let path = S3::get().object_path(&format!("{prefix}{}/{h}", &h[..2]));
    std::fs::write(&path, b"not the chunk").expect("writing the object's file of s3s-fs");
    let e = s.read(&d2, &mut buf).unwrap_err();
    assert_eq!(e.facts().reason, "CHUNK_DAMAGED", "{e}");
    assert!(e.to_string().contains(&h), "{e}");

    for d in [d1, d2] {
        s.remove(&d).unwrap();
        assert!(!s.has(&d).unwrap());
    }
    s.remove(&d1).expect("removing an absent chunk is fine");
    let e = s.read(&d1, &mut buf).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(s.list().unwrap().is_empty());
}

#[test]
fn a_wrong_secret_is_refused_naming_the_bucket() {
    let _l = S3_LOCK.blocking_read();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s = store(&rt, "imagerepo-test-denied/", "not-the-secret");
    let e = s.check().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    assert!(e.to_string().contains(&S3::get().bucket), "{e}");
    assert!(!e.to_string().contains("not-the-secret"), "{e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repository_on_s3_dedups_reads_back_and_collects_in_the_bucket() {
    let _l = S3_LOCK.read().await;
    let s3 = S3::get();
    let prefix = format!("imagerepo-server-{}/", std::process::id());
    // [chunks] goes after the [catalog] table the harness writes.
    let srv = RepoServer::start(
        &format!(
            "\n[chunks]\nbackend = \"s3\"\nendpoint = {:?}\nbucket = {:?}\naccess_key = {:?}\n\
             secret_key = {:?}\nprefix = {prefix:?}\n",
            s3.endpoint, s3.bucket, s3.access_key, s3.secret_key
        ),
        "gc_grace_secs = 0",
    );
    let objects = |prefix: &str| -> Vec<String> {
        let dir = s3.object_path(prefix);
        let mut out = Vec::new();
        for sub in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            for f in std::fs::read_dir(sub.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                out.push(f.file_name().to_string_lossy().into_owned());
            }
        }
        out.sort();
        out
    };
    let mut c = srv.service("alpha").await;
    let size = 3 * (4 << 20) as u64;
    let a = TestChunk::new(0, 901, 4 << 20);
    let b = TestChunk::new(2, 902, 4 << 20);
    let up = begin(&mut c, "alpha", "web", "", "", size).await.unwrap();
    let (img, asked) = finish(&mut c, &up.name, size, &[a.clone(), b.clone()])
        .await
        .unwrap();
    assert_eq!(asked, 2);
    assert_eq!(img.state, pb::ImageState::Active as i32);
    let mut want = vec![a.digest(), b.digest()];
    want.sort();
    assert_eq!(
        objects(&prefix),
        want,
        "every chunk is an object of the bucket"
    );

    // A second image sharing `a`: only the new chunk is asked for and stored.
    let c2 = TestChunk::new(1, 903, 4 << 20);
    let up2 = begin(&mut c, "alpha", "db", "", "", size).await.unwrap();
    let (img2, asked) = finish(&mut c, &up2.name, size, &[a.clone(), c2.clone()])
        .await
        .unwrap();
    assert_eq!(asked, 1, "only the chunk the bucket lacks is sent");
    assert_eq!(objects(&prefix).len(), 3);
    for (image, ch) in [(&img.name, &a), (&img.name, &b), (&img2.name, &c2)] {
        let back = read_chunk(&mut c, image, &ch.digest()).await.unwrap();
        assert!(back == ch.data, "chunk {} read back differs", ch.digest());
    }

    // Purging `web` and collecting removes `b` from the bucket, keeps the shared `a`.
    for call in ["delete", "purge"] {
        let name = img.name.clone();
        if call == "delete" {
            c.catalog
                .delete_image(c.req(pb::DeleteImageRequest { name }))
                .await
                .unwrap();
        } else {
            c.catalog
                .purge_image(c.req(pb::PurgeImageRequest { name }))
                .await
                .unwrap();
        }
    }
    let mut admin = srv.tls("repo-admin").await;
    let r = admin
        .catalog
        .run_garbage_collection(admin.req(pb::RunGarbageCollectionRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.chunks_removed, 1);
    let mut left = vec![a.digest(), c2.digest()];
    left.sort();
    assert_eq!(objects(&prefix), left);

    // Clean the bucket of this run's objects.
    let rt_dir = s3.object_path(&prefix);
    let _ = std::fs::remove_dir_all(rt_dir);
}
