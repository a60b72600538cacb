//! `imagectl repo` against the real `imagerepo` binary: the test captures images through the
//! chunk protocol (the unix socket's service identity, acting for project `alpha`), then drives
//! the real `imagectl` binary over the same socket: the image list as CSV (header, quoting that
//! reads back) and JSON, filters, a batch delete with a mixed outcome (every image's outcome
//! printed, a non-zero exit), the recycle bin, and the errors' exit codes.

use std::process::{Command, Output, Stdio};

use imaged::proto::imagerepo::v1 as pb;
use serde_json::Value;

use crate::support::repo_server::{capture, RepoServer, TestChunk};

const MIB: u64 = 1 << 20;

/// Runs the real `imagectl repo` with the server's socket and project alpha.
fn repo(srv: &RepoServer, args: &[&str]) -> Output {
    repo_as(srv, "alpha", args)
}

/// Runs the real `imagectl repo` with the server's socket, acting for `project`.
fn repo_as(srv: &RepoServer, project: &str, args: &[&str]) -> Output {
    let endpoint = format!("unix://{}", srv.socket.display());
    Command::new(env!("CARGO_BIN_EXE_imagectl"))
        .args(["repo", "--repo-endpoint", &endpoint, "--project", project])
        .args(args)
        .env_remove("IMAGEREPO_PROJECT")
        .env_remove("IMAGEREPO_ENDPOINT")
        .stdin(Stdio::null())
        .output()
        .expect("running imagectl")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Runs `imagectl repo ARGS`, asserts exit 0 and returns stdout.
fn ok(srv: &RepoServer, args: &[&str]) -> String {
    ok_as(srv, "alpha", args)
}

/// Runs `imagectl repo ARGS` for `project`, asserts exit 0 and returns stdout.
fn ok_as(srv: &RepoServer, project: &str, args: &[&str]) -> String {
    let o = repo_as(srv, project, args);
    let (out, err) = text(&o);
    assert!(
        o.status.success(),
        "imagectl repo {args:?} failed ({}): {out}{err}",
        o.status
    );
    out
}

fn json(srv: &RepoServer, args: &[&str]) -> Value {
    json_as(srv, "alpha", args)
}

fn json_as(srv: &RepoServer, project: &str, args: &[&str]) -> Value {
    let mut full = vec!["--json"];
    full.extend_from_slice(args);
    let out = ok_as(srv, project, &full);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {out}"))
}

/// An RFC 4180 reader (quoted fields, doubled quotes, CRLF), to read the export back.
fn read_csv(text: &str) -> Vec<Vec<String>> {
    let (mut rows, mut row, mut field, mut quoted) = (Vec::new(), Vec::new(), String::new(), false);
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
    assert!(field.is_empty() && row.is_empty(), "CSV ends mid-row");
    rows
}

fn id(image: &pb::Image) -> String {
    image.name.rsplit('/').next().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_export_and_batch_delete() {
    let srv = RepoServer::start("", "");
    let mut alpha = srv.service("alpha").await;
    let mut images = Vec::new();
    for (seed, name) in [(1u64, "web"), (2, "db"), (3, "cache")] {
        let chunks = [TestChunk::new(0, seed, MIB as usize)];
        let img = capture(&mut alpha, "alpha", name, "v1", MIB, &chunks)
            .await
            .unwrap_or_else(|e| panic!("capturing {name}: {e:?}"));
        images.push(img);
    }
    let (web, db, cache) = (id(&images[0]), id(&images[1]), id(&images[2]));

    // A description that CSV must quote, set through the CLI.
    let tricky = "patched, \"golden\"\nsecond line";
    let out = json(
        &srv,
        &[
            "update",
            &web,
            "--display-name",
            "web golden",
            "--description",
            tricky,
        ],
    );
    assert_eq!(out["description"], tricky, "{out}");

    // CSV: a header row, one row per image, every row as wide as the header, reads back.
    let csv = ok(&srv, &["list", "--format", "csv"]);
    let rows = read_csv(&csv);
    assert_eq!(rows.len(), 4, "header and three images:\n{csv}");
    let header = &rows[0];
    assert_eq!(&header[..3], ["name", "id", "image_name"]);
    assert!(rows.iter().all(|r| r.len() == header.len()), "{csv}");
    let col = |n: &str| header.iter().position(|h| h == n).unwrap();
    let web_row = rows
        .iter()
        .find(|r| r[col("id")] == web)
        .unwrap_or_else(|| panic!("{web} not in\n{csv}"));
    assert_eq!(web_row[col("description")], tricky);
    assert_eq!(web_row[col("display_name")], "web golden");
    assert_eq!(web_row[col("state")], "active");
    assert_eq!(web_row[col("project")], "alpha");
    assert_eq!(web_row[col("virtual_size_bytes")], MIB.to_string());

    // JSON, and the filters.
    let all = json(&srv, &["list"]);
    assert_eq!(all.as_array().unwrap().len(), 3, "{all}");
    let only = json(&srv, &["list", "--name", "web", "--state", "active"]);
    let only = only.as_array().unwrap();
    assert_eq!(only.len(), 1, "{only:?}");
    assert_eq!(only[0]["id"], web.as_str());
    assert_eq!(
        json(&srv, &["list", "--format", "json", "--os", "windows"]),
        serde_json::json!([])
    );
    let table = ok(&srv, &["list"]);
    assert!(table.starts_with("IMAGE"), "{table}");
    assert!(table.contains("web:v1") && table.contains(&db), "{table}");

    // Batch delete with a mixed outcome: db is in use, so it stays; web goes to the bin.
    let marked = json(
        &srv,
        &["in-use", "mark", &db, "--user", "domains/vm7@host3"],
    );
    assert_eq!(marked["in_use_by"], "domains/vm7@host3");
    let o = repo(&srv, &["delete", &web, &db]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(4), "one conflict: exit 4\n{out}{err}");
    let line = |name: &str| {
        out.lines()
            .find(|l| l.contains(name))
            .unwrap_or_else(|| panic!("no outcome for {name}:\n{out}"))
            .to_string()
    };
    assert!(line(&web).contains("deleted"), "{out}");
    assert!(line(&db).contains("FAILED_PRECONDITION"), "{out}");
    assert!(out.contains("1 deleted, 1 failed"), "{out}");

    // JSON outcomes, with an image that does not exist: cache goes, the other fails.
    let o = repo(&srv, &["--json", "delete", &cache, "img-nosuch"]);
    let (out, err) = text(&o);
    assert_ne!(o.status.code(), Some(0), "{out}{err}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["failed"], 1, "{v}");
    let outcomes = v["outcomes"].as_array().unwrap();
    assert_eq!(outcomes.len(), 2);
    assert_eq!(outcomes[0]["ok"], true, "{v}");
    assert_eq!(outcomes[1]["ok"], false, "{v}");
    assert!(outcomes[1]["name"]
        .as_str()
        .unwrap()
        .ends_with("img-nosuch"));

    // The recycle bin: listed with --deleted, restored with undelete.
    let bin = json(&srv, &["list", "--state", "deleted"]);
    let mut ids: Vec<&str> = bin
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    ids.sort();
    let mut want = vec![web.as_str(), cache.as_str()];
    want.sort();
    assert_eq!(ids, want, "{bin}");
    assert_eq!(json(&srv, &["list"]).as_array().unwrap().len(), 1);
    assert_eq!(
        json(&srv, &["list", "--deleted"]).as_array().unwrap().len(),
        3
    );
    let back = json(&srv, &["undelete", &web]);
    assert_eq!(back["state"], "active", "{back}");

    // Errors: exit codes of the other commands, the image named in the message.
    let o = repo(&srv, &["get", "img-nosuch"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(3), "not found: exit 3\n{out}{err}");
    assert!(err.contains("projects/alpha/images/img-nosuch"), "{err}");
    let o = repo(&srv, &["--json", "get", "img-nosuch"]);
    let v: Value = serde_json::from_str(&text(&o).0).unwrap();
    assert_eq!(v["error"]["code"], "NOT_FOUND", "{v}");
    let o = Command::new(env!("CARGO_BIN_EXE_imagectl"))
        .args(["repo", "--repo-endpoint"])
        .arg(format!(
            "unix://{}",
            srv.socket.with_extension("absent").display()
        ))
        .args(["list"])
        .env_remove("IMAGEREPO_PROJECT")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(5), "unreachable: exit 5");
    assert!(
        text(&o).1.contains("is imagerepo running?"),
        "{:?}",
        text(&o)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn share_accept_and_quota() {
    let srv = RepoServer::start("", "");
    let mut alpha = srv.service("alpha").await;
    let chunks = [TestChunk::new(0, 11, MIB as usize)];
    let img = capture(&mut alpha, "alpha", "base", "v1", MIB, &chunks)
        .await
        .unwrap();
    let base = id(&img);

    // The owner shares; the member project sees it pending, accepts it, then lists it.
    let m = json(&srv, &["share", &base, "beta"]);
    assert_eq!(m["member_project"], "beta", "{m}");
    assert_eq!(m["state"], "pending", "{m}");
    let members = ok(&srv, &["members", &base]);
    assert!(members.starts_with("MEMBER"), "{members}");
    assert!(
        members
            .lines()
            .any(|l| l.starts_with("beta") && l.contains("pending")),
        "{members}"
    );
    let owner_image = format!("alpha/{base}");
    let m = json_as(&srv, "beta", &["accept", &owner_image]);
    assert_eq!(m["state"], "accepted", "{m}");
    let seen = json_as(&srv, "beta", &["list"]);
    let seen = seen.as_array().unwrap();
    assert!(
        seen.iter()
            .any(|i| i["id"] == base.as_str() && i["visibility"] == "shared"),
        "{seen:?}"
    );
    // A member acting as owner is refused, with the exit code of a denial or a conflict.
    let o = repo_as(&srv, "beta", &["delete", &owner_image]);
    assert_ne!(o.status.code(), Some(0), "{:?}", text(&o));
    let m = json_as(&srv, "beta", &["reject", &owner_image]);
    assert_eq!(m["state"], "rejected", "{m}");
    let out = ok(&srv, &["unshare", &base, "beta"]);
    assert!(out.contains("stopped sharing"), "{out}");
    assert_eq!(json(&srv, &["members", &base]), serde_json::json!([]));

    // Quota: alpha holds one private image of the default ten.
    let q = json(&srv, &["quota", "get"]);
    assert_eq!(q["image_count"], 1, "{q}");
    assert_eq!(q["image_limit"], 10, "{q}");
    let line = ok(&srv, &["quota", "get", "alpha"]);
    assert_eq!(line.trim(), "project alpha: 1 of 10 private images");
}
