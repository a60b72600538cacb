//! Every combination of the repository's storage and download settings works, or is refused
//! at start: the catalog (SQLite, PostgreSQL) × the chunk store (local directory, S3) × download
//! links (served, not served), each on the real `imagerepo` binary with the real PostgreSQL and
//! S3 servers of the tests.
//!
//! Each combination stores an image through the chunk protocol and shows that every setting
//! took effect where it says: the chunk is a file of the data directory or an object of the
//! bucket (and not the other), the catalog is the SQLite file or the PostgreSQL database (the
//! data directory then holds no `catalog.db`), a link is made and serves the bytes, or is
//! refused with `DOWNLOADS_DISABLED`. Settings that cannot combine are refused by
//! `imagerepo --check-config` naming the key (TCP without TLS; see also the unit tests of
//! `imagerepo::config`).

use imaged::proto::imagerepo::v1 as pb;
use tonic::Code;

use crate::support::repo_server::{capture, reason, Backend, RepoServer, TestChunk};
use crate::support::servers::{S3, S3_LOCK};

const CHUNK: u64 = 4 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunks {
    Local,
    S3,
}

async fn one_combination(backend: Backend, chunks: Chunks, downloads: bool) {
    let label = format!("{backend:?} catalog, {chunks:?} chunks, downloads {downloads}");
    let s3 = S3::get();
    let prefix = format!(
        "imagerepo-settings-{}-{backend:?}-{downloads}/",
        std::process::id()
    )
    .to_lowercase();
    let chunks_toml = match chunks {
        Chunks::Local => String::new(),
        Chunks::S3 => format!(
            "\n[chunks]\nbackend = \"s3\"\nendpoint = {:?}\nbucket = {:?}\naccess_key = {:?}\n\
             secret_key = {:?}\nprefix = {prefix:?}\n",
            s3.endpoint, s3.bucket, s3.access_key, s3.secret_key
        ),
    };
    let srv = RepoServer::start_full(backend, &chunks_toml, "", downloads);
    let mut c = srv.service("alpha").await;
    let size = 2 * CHUNK;
    let data = TestChunk::new(1, 7000 + downloads as u64, CHUNK as usize);
    let img = capture(
        &mut c,
        "alpha",
        "combo",
        "",
        size,
        std::slice::from_ref(&data),
    )
    .await
    .unwrap_or_else(|e| panic!("{label}: capture refused: {e:?}"));
    assert_eq!(img.state, pb::ImageState::Active as i32, "{label}: {img:?}");

    // The chunk went where the settings say, and only there.
    let digest = data.digest();
    let object = s3.object_path(&format!("{prefix}{}/{digest}", &digest[..2]));
    let file = srv.chunk_file(&digest);
    match chunks {
        Chunks::Local => {
            assert!(file.exists(), "{label}: no chunk file {}", file.display());
            assert!(
                !object.exists(),
                "{label}: a bucket object {}",
                object.display()
            );
        }
        Chunks::S3 => {
            assert!(object.exists(), "{label}: no object {}", object.display());
            assert!(!file.exists(), "{label}: a chunk file {}", file.display());
        }
    }
    // So did the catalog.
    let sqlite_file = srv.data.join("catalog.db");
    assert_eq!(
        sqlite_file.exists(),
        backend == Backend::Sqlite,
        "{label}: {} exists: {}",
        sqlite_file.display(),
        sqlite_file.exists()
    );

    // Download links: served, with the image's bytes, or refused by reason.
    let asked = c
        .catalog
        .create_download_link(c.req(pb::CreateDownloadLinkRequest {
            name: img.name.clone(),
            format: pb::ImageFormat::Raw as i32,
            ttl: None,
        }))
        .await;
    if downloads {
        let link = asked
            .unwrap_or_else(|e| panic!("{label}: link refused: {e:?}"))
            .into_inner();
        let body = reqwest::get(&link.url)
            .await
            .and_then(|r| r.error_for_status())
            .unwrap_or_else(|e| panic!("{label}: GET {}: {e}", link.url))
            .bytes()
            .await
            .unwrap();
        assert_eq!(body.len() as u64, size, "{label}");
        assert!(
            body[..CHUNK as usize].iter().all(|b| *b == 0)
                && body[CHUNK as usize..] == data.data[..],
            "{label}: the download differs from the image"
        );
    } else {
        let st = asked.expect_err("no links without [download]");
        assert_eq!(st.code(), Code::FailedPrecondition, "{label}: {st:?}");
        assert_eq!(reason(&st), "DOWNLOADS_DISABLED", "{label}: {st:?}");
        assert!(st.message().contains("download_listen"), "{label}: {st:?}");
    }
    drop(srv);
    let _ = std::fs::remove_dir_all(s3.object_path(&prefix));
}

#[tokio::test(flavor = "multi_thread")]
async fn every_catalog_chunk_store_and_download_combination_serves() {
    let _l = S3_LOCK.read().await;
    for backend in [Backend::Sqlite, Backend::Postgres] {
        for chunks in [Chunks::Local, Chunks::S3] {
            for downloads in [true, false] {
                one_combination(backend, chunks, downloads).await;
            }
        }
    }
}

#[test]
fn settings_that_cannot_combine_are_refused_at_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("imagerepo.toml");
    let data = dir.path().join("data");
    for (text, key) in [
        // TCP is served only with mutual TLS.
        (
            format!("[server]\ndata_dir = {data:?}\ntcp_listen = \"127.0.0.1:0\"\n"),
            "server.tcp_listen",
        ),
        // A PostgreSQL catalog needs its URL; S3 chunks need their bucket.
        (
            "[catalog]\nbackend = \"postgres\"\n".to_string(),
            "catalog.url",
        ),
        (
            "[chunks]\nbackend = \"s3\"\nendpoint = \"http://127.0.0.1:1\"\n".to_string(),
            "bucket",
        ),
        // A public base URL must be a URL.
        (
            "[download]\ndownload_listen = \"127.0.0.1:0\"\npublic_base_url = \"files.example\"\n"
                .to_string(),
            "download.public_base_url",
        ),
    ] {
        std::fs::write(&path, &text).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_imagerepo"))
            .arg("--config")
            .arg(&path)
            .arg("--check-config")
            .output()
            .expect("imagerepo runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {err}");
        assert!(err.contains(key), "{text}: expected {key} named: {err}");
    }
}
