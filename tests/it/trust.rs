//! Who may do what, end to end and without guests: a daemon serving TCP with mutual TLS
//! (certificates made here with rcgen), identities mapped to roles by `[[policy]]`, unix peers
//! judged by their uid, import and export kept inside the allowed directories, secrets files
//! with loose modes refused at start, and a SIGHUP that rotates the server certificate while
//! connections made before go on working.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use imaged::proto;
use imaged::proto::google::longrunning::Operation;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;

use crate::support::daemon::{Daemon, DaemonOptions};
use crate::support::pki::{tls_daemon, write, Ca, Pki};

// ------------------------------------------------------------------ calls of the API

/// ListImages; the number of images.
async fn list_images(ch: &Channel) -> Result<usize, tonic::Status> {
    let mut c = proto::image_service_client::ImageServiceClient::new(ch.clone());
    let r = c.list_images(proto::ListImagesRequest::default()).await?;
    Ok(r.into_inner().images.len())
}

/// Starts an import of a raw file.
async fn import_raw(ch: &Channel, path: &Path, name: &str) -> Result<Operation, tonic::Status> {
    let mut c = proto::image_service_client::ImageServiceClient::new(ch.clone());
    let r = c
        .import_image(proto::ImportImageRequest {
            path: path.to_str().unwrap().into(),
            format: proto::ImageFormat::Raw as i32,
            image_id: name.into(),
            ..Default::default()
        })
        .await?;
    Ok(r.into_inner())
}

/// Starts an export to a raw file.
async fn export_raw(
    ch: &Channel,
    name: &str,
    path: &Path,
    overwrite: bool,
) -> Result<Operation, tonic::Status> {
    let mut c = proto::image_service_client::ImageServiceClient::new(ch.clone());
    let r = c
        .export_image(proto::ExportImageRequest {
            name: format!("images/{name}"),
            format: proto::ImageFormat::Raw as i32,
            path: path.to_str().unwrap().into(),
            overwrite,
            request_id: String::new(),
        })
        .await?;
    Ok(r.into_inner())
}

/// The method names the denials of these calls carry.
const LIST_IMAGES: &str = "imaged.v1.ImageService/ListImages";
const IMPORT: &str = "imaged.v1.ImageService/ImportImage";

/// A channel over mutual TLS trusting `ca` (PEM file), with the client certificate `client`.
async fn tls_channel(
    url: &str,
    ca: &Path,
    client: Option<&(PathBuf, PathBuf)>,
) -> Result<Channel, String> {
    let mut tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()));
    if let Some((c, k)) = client {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(c).unwrap(),
            std::fs::read(k).unwrap(),
        ));
    }
    Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect_timeout(Duration::from_secs(10))
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

/// Waits until the daemon's log holds `words` (all of them on one line).
fn wait_log(d: &Daemon, words: &[&str]) -> String {
    let t0 = Instant::now();
    loop {
        let log = d.log_text();
        if let Some(l) = log.lines().find(|l| words.iter().all(|w| l.contains(w))) {
            return l.to_string();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no log line with {words:?}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The handshake fails for `client`: no channel, or the first call fails; the daemon logs
/// the failed handshake with `reason`.
async fn refused(
    d: &Daemon,
    url: &str,
    ca: &Path,
    client: Option<&(PathBuf, PathBuf)>,
    reason: &str,
) {
    let before = d.log_text().matches("TLS handshake failed").count();
    match tls_channel(url, ca, client).await {
        Err(e) => assert!(!e.is_empty()),
        Ok(ch) => {
            let e = list_images(&ch)
                .await
                .expect_err("a refused client must not be served");
            assert!(
                // The server ends the handshake; the client sees the connection fail or close.
                matches!(
                    e.code(),
                    Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
                ),
                "{e:?}"
            );
        }
    }
    let t0 = Instant::now();
    loop {
        let log = d.log_text();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("TLS handshake failed"))
            .collect();
        if lines.len() > before {
            let l = lines[lines.len() - 1];
            assert!(l.contains("peer=127.0.0.1:"), "{l}");
            assert!(
                l.to_lowercase().contains(&reason.to_lowercase()),
                "want {reason:?}: {l}"
            );
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no failed handshake logged:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ------------------------------------------------------------------ tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_identifies_clients_and_refuses_strangers() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let policy = "[[policy]]\nrole = \"admin\"\nunix_uids = [0]\n\
                  [[policy]]\nrole = \"operator\"\ntls_sans = [\"spiffe://imaged.test/cp1\"]\n\
                  [[policy]]\nrole = \"viewer\"\ntls_subjects = [\"dash\"]\n";
    let (d, url) = tls_daemon(&pki, policy);
    let ca = pki.dir.join("server-ca.pem");

    let cp1 = pki.client("cp1", None, false);
    let ch = tls_channel(&url, &ca, Some(&cp1)).await.unwrap();
    assert_eq!(list_images(&ch).await.unwrap(), 0);

    // A viewer reads, and may not start work: the denial names who and what, and is logged.
    let dash = pki.client("dash", None, false);
    let ch = tls_channel(&url, &ca, Some(&dash)).await.unwrap();
    assert_eq!(list_images(&ch).await.unwrap(), 0);
    let src = d.dir.path().join("src.raw");
    std::fs::write(&src, vec![0u8; 1 << 20]).unwrap();
    let e = import_raw(&ch, &src, "nope").await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("TLS client CN=dash"),
        "{}",
        e.message()
    );
    assert!(e.message().contains(IMPORT), "{}", e.message());
    assert!(
        e.message()
            .contains("needs the operator role; the policy gives it viewer"),
        "{}",
        e.message()
    );
    let l = wait_log(&d, &["request denied", "tls:CN=dash", IMPORT]);
    assert!(l.contains("WARN"), "{l}");

    // A client the policy does not know connects (its certificate is good) but may do nothing.
    let other = pki.client("other", None, false);
    let ch = tls_channel(&url, &ca, Some(&other)).await.unwrap();
    let e = list_images(&ch).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message().contains("the policy gives it none"),
        "{}",
        e.message()
    );

    // No certificate, one of another CA, an expired one: the handshake fails.
    refused(&d, &url, &ca, None, "no certificates").await;
    let stranger_ca = Ca::new("someone else's CA");
    let stranger = pki.client("stranger", Some(&stranger_ca), false);
    refused(&d, &url, &ca, Some(&stranger), "UnknownIssuer").await;
    let old = pki.client("old", None, true);
    refused(&d, &url, &ca, Some(&old), "expired").await;

    // imagectl over TCP with the same files (flags), and from the environment.
    let out = Command::new(env!("CARGO_BIN_EXE_imagectl"))
        .args(["--endpoint", &url, "--ca", ca.to_str().unwrap()])
        .args([
            "--cert",
            cp1.0.to_str().unwrap(),
            "--key",
            cp1.1.to_str().unwrap(),
        ])
        .args(["--json", "images"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(env!("CARGO_BIN_EXE_imagectl"))
        .env("IMAGED_ENDPOINT", &url)
        .env("IMAGED_CA", &ca)
        .env("IMAGED_CERT", &dash.0)
        .env("IMAGED_KEY", &dash.1)
        .args([
            "import",
            src.to_str().unwrap(),
            "--format",
            "raw",
            "--name",
            "x",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("may not call") && err.contains("CN=dash"),
        "{err}"
    );
    // Without a client certificate imagectl says what is missing.
    let out = Command::new(env!("CARGO_BIN_EXE_imagectl"))
        .args(["--endpoint", &url, "--ca", ca.to_str().unwrap(), "images"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--cert"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_peers_outside_the_policy_are_refused() {
    // The default policy: root is admin, nobody else anything.
    let d = Daemon::start_with(DaemonOptions {
        daemon_toml: "socket_mode = \"0666\"\n".into(),
        ..Default::default()
    });
    // Let uid 65534 reach the socket (and the binary) at all.
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_imagectl"))
        .arg("--socket")
        .arg(&d.socket)
        .arg("images")
        .output()
        .expect("setpriv (util-linux) runs imagectl as nobody");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(7),
        "imagectl's exit code for a refusal: {err}"
    );
    assert!(
        err.contains(&format!(
            "uid 65534 (gid 65534) may not call {LIST_IMAGES}: it needs the viewer role; the policy gives it none"
        )),
        "{err}"
    );
    wait_log(&d, &["request denied", "uid:65534", LIST_IMAGES]);
    // Root, on the same socket, is admin.
    let ch = d.channel().await;
    assert_eq!(list_images(&ch).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_and_export_stay_inside_the_allowed_directories() {
    // Only the daemon's own directories: the test's temp files are outside too.
    let d = Daemon::start_with(DaemonOptions {
        paths_toml: Some(String::new()),
        ..Default::default()
    });
    let ch = d.channel().await;
    let own_import = std::fs::canonicalize(d.repo.join("import")).unwrap();
    let own_export = std::fs::canonicalize(d.repo.join("export")).unwrap();
    assert_eq!(
        std::fs::metadata(&own_import).unwrap().permissions().mode() & 0o777,
        0o700
    );

    let e = import_raw(&ch, Path::new("/etc/shadow"), "shadow")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("/etc/shadow"), "{}", e.message());
    assert!(
        e.message().contains(own_import.to_str().unwrap()),
        "{}",
        e.message()
    );
    // A link inside the import directory to a file outside, and `..`, lead nowhere.
    std::os::unix::fs::symlink("/etc/shadow", own_import.join("shadow.raw")).unwrap();
    for p in [
        own_import.join("shadow.raw"),
        own_import.join("../../../../../../../etc/shadow"),
    ] {
        let e = import_raw(&ch, &p, "shadow").await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{}: {e:?}", p.display());
    }

    // A file inside is imported; exporting it over /etc/passwd is refused.
    let src = own_import.join("disk.raw");
    std::fs::write(&src, vec![7u8; 1 << 20]).unwrap();
    let op = import_raw(&ch, &src, "disk").await.unwrap();
    d.assert_active(&d.wait_op(op.name.trim_start_matches("operations/")).await);
    let passwd = std::fs::read("/etc/passwd").unwrap();
    let e = export_raw(&ch, "disk", Path::new("/etc/passwd"), true)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("/etc/passwd"), "{}", e.message());
    assert!(
        e.message().contains(own_export.to_str().unwrap()),
        "{}",
        e.message()
    );
    let outside = d.dir.path().join("out.raw");
    let e = export_raw(&ch, "disk", &outside, false).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert_eq!(std::fs::read("/etc/passwd").unwrap(), passwd);
    assert!(!outside.exists());
    let op = export_raw(&ch, "disk", &own_export.join("disk.raw"), false)
        .await
        .unwrap();
    d.assert_active(&d.wait_op(op.name.trim_start_matches("operations/")).await);
    assert_eq!(
        std::fs::read(own_export.join("disk.raw")).unwrap(),
        vec![7u8; 1 << 20]
    );
}

#[test]
fn secrets_readable_by_others_are_refused_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("imaged.toml");
    let check = |cfg: &Path| {
        Command::new(env!("CARGO_BIN_EXE_imaged"))
            .arg("--config")
            .arg(cfg)
            .arg("--check-config")
            .output()
            .unwrap()
    };
    let secret = "[targets.store]\nkind = \"s3\"\nendpoint = \"http://127.0.0.1:9\"\n\
                  bucket = \"b\"\naccess_key = \"a\"\nsecret_key = \"hunter2\"\n";
    write(&cfg, secret, 0o644);
    let out = check(&cfg);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(cfg.to_str().unwrap()) && err.contains("0644"),
        "{err}"
    );
    assert!(
        err.contains(&format!("chmod 600 {}", cfg.display())),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(check(&cfg).status.success());

    // A TLS key every user may read.
    let pki = Pki::new(&tmp.path().join("pki"));
    write(&cfg, &pki.tls_toml(), 0o644);
    let key = pki.dir.join("server.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = check(&cfg);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(key.to_str().unwrap()) && err.contains("chmod 600"),
        "{err}"
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(check(&cfg).status.success());

    // TCP without [tls] is refused, naming the way out.
    write(&cfg, "[daemon]\ntcp_listen = \"0.0.0.0:7443\"\n", 0o600);
    let out = check(&cfg);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("[tls]") && err.contains("daemon.tcp_listen"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rotates_the_server_certificate_and_open_connections_live_on() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(&tmp.path().join("pki"));
    let policy = "[[policy]]\nrole = \"admin\"\nunix_uids = [0]\ntls_subjects = [\"cp1\"]\n";
    let (d, url) = tls_daemon(&pki, policy);
    let old_ca = pki.dir.join("server-ca.pem");
    let cp1 = pki.client("cp1", None, false);
    let before = tls_channel(&url, &old_ca, Some(&cp1)).await.unwrap();
    list_images(&before).await.unwrap();
    // A stream opened before the reload: reflection answers each request on it.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let ask = || ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    tx.send(ask()).await.unwrap();
    let mut stream = ServerReflectionClient::new(before.clone())
        .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();

    // A reload that fails keeps what is in force.
    let key = pki.dir.join("server.key");
    let good_key = std::fs::read(&key).unwrap();
    write(&key, "not a key", 0o600);
    // SAFETY: kill(2) on the daemon we started.
    unsafe { libc::kill(d.pid() as i32, libc::SIGHUP) };
    wait_log(&d, &["reload failed", "tls.key"]);
    std::fs::write(&key, &good_key).unwrap();
    let again = tls_channel(&url, &old_ca, Some(&cp1)).await.unwrap();
    list_images(&again).await.unwrap();

    // Rotate: a new server CA and certificate, then SIGHUP.
    let new_ca = Ca::new("imaged test server CA, rotated");
    pki.write_server(&new_ca, "server-ca-2.pem");
    // SAFETY: as above.
    unsafe { libc::kill(d.pid() as i32, libc::SIGHUP) };
    wait_log(&d, &["SIGHUP: reloaded", "TLS certificate"]);
    let new_ca_file = pki.dir.join("server-ca-2.pem");
    let after = tls_channel(&url, &new_ca_file, Some(&cp1)).await.unwrap();
    assert_eq!(list_images(&after).await.unwrap(), 0);
    // A client that trusts only the old CA cannot make a new connection...
    assert!(match tls_channel(&url, &old_ca, Some(&cp1)).await {
        Err(_) => true,
        Ok(ch) => list_images(&ch).await.is_err(),
    });
    // ...while the connection and the stream made before go on.
    list_images(&before).await.unwrap();
    tx.send(ask()).await.unwrap();
    let r = stream.message().await.unwrap().unwrap();
    assert!(format!("{r:?}").contains("imaged.v1.ImageService"), "{r:?}");
    drop(tx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_holds_hundreds_of_streams() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let d = Daemon::start();
    let ch = d.channel().await;
    let mut held = Vec::new();
    for _ in 0..200 {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        })
        .await
        .unwrap();
        let mut s = ServerReflectionClient::new(ch.clone())
            .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        s.message().await.unwrap().unwrap();
        held.push((tx, s));
    }
    // All open at once, and the connection still answers.
    assert_eq!(list_images(&ch).await.unwrap(), 0);
    drop(held);
}
