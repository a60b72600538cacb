//! Prep end to end: a running guest with a static network configuration, persistent-net udev
//! rules, an rc file and a real data disk mounted through fstab is captured with `--prep all
//! --restore-source` through imagectl, in quiesce mode and in shutdown mode (prep in the running
//! guest, shut down, capture, start again, undo). The *image* is prepared (read straight out of
//! the exported ext4 image with debugfs) and boots to its guest agent; the *source* is exactly
//! as it was, data disk mounted. A daemon killed between the prep and its undo leaves a journal
//! entry that the restarted daemon carries out.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::support::daemon::Daemon;
use crate::support::lab::{Guest, Lab};

const INTERFACES: &str = "auto lo\niface lo inet loopback\n\nauto eth0\niface eth0 inet static\n    address 192.0.2.10\n    netmask 255.255.255.0\n    gateway 192.0.2.1\n";
const UDEV: &str =
    "SUBSYSTEM==\"net\", ACTION==\"add\", ATTR{address}==\"52:54:00:12:34:56\", NAME=\"eth0\"\n";
const RC: &str = "#!/bin/sh\n# rc: runs the scripts of a runlevel\necho starting\nexit 0\n";
const HOOK: &str = "sh /etc/init.d/setpasswd.sh";

/// A file of an ext4 image, read without mounting it.
fn image_file(raw: &Path, path: &str) -> Option<String> {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(raw)
        .output()
        .expect("debugfs (e2fsprogs)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    (!err.contains("File not found")).then_some(text)
}

fn watched(g: &Guest) -> Vec<(String, Option<Vec<u8>>)> {
    [
        "/etc/network/interfaces",
        "/etc/udev/rules.d/70-persistent-net.rules",
        "/etc/init.d/rc",
        "/etc/fstab",
    ]
    .iter()
    .map(|p| {
        (
            p.to_string(),
            (g.sh(&format!("test -e {p}")).0 == 0).then(|| g.read_file(p)),
        )
    })
    .collect()
}

/// A running guest whose configuration every prep step changes: static network, udev rule,
/// rc file, a data disk mounted by UUID. Returns it with the data disk's UUID.
fn prepared_source(lab: &Lab, prefix: &str) -> (Guest, String) {
    let g = lab.guest(prefix).data_disk(64 << 20).create();
    g.start();
    g.wait_agent(Duration::from_secs(180));
    g.wait_booted(Duration::from_secs(180));
    g.write_file("/etc/network/interfaces", INTERFACES.as_bytes());
    g.write_file("/etc/udev/rules.d/70-persistent-net.rules", UDEV.as_bytes());
    g.write_file("/etc/init.d/rc", RC.as_bytes());
    g.sh_ok("chmod 755 /etc/init.d/rc && mkfs.ext4 -q /dev/vdb && mkdir -p /mnt/data");
    let uuid = g
        .sh_ok("blkid -s UUID -o value /dev/vdb")
        .trim()
        .to_string();
    g.sh_ok(&format!("echo 'UUID={uuid} /mnt/data ext4 defaults 0 2' >> /etc/fstab && mount /mnt/data && echo kept > /mnt/data/file && sync"));
    (g, uuid)
}

/// The image `name` of `d`, exported raw, has every prep step applied.
fn assert_image_prepared(d: &Daemon, name: &str, uuid: &str) {
    let raw = d.dir.path().join(format!("{name}.raw"));
    d.imagectl_export(name, "raw", &raw);
    let ifaces = image_file(&raw, "/etc/network/interfaces").expect("interfaces in the image");
    assert!(
        ifaces.contains("iface eth0 inet dhcp") && !ifaces.contains("192.0.2.10"),
        "{ifaces}"
    );
    assert!(
        image_file(&raw, "/etc/udev/rules.d/70-persistent-net.rules").is_none(),
        "udev rule still in the image"
    );
    assert!(ifaces.contains("iface lo inet loopback"), "{ifaces}");
    let rc = image_file(&raw, "/etc/init.d/rc").expect("rc in the image");
    assert_eq!(rc.matches(HOOK).count(), 1, "{rc}");
    assert!(
        rc.find(HOOK).unwrap() < rc.rfind("exit 0").unwrap(),
        "the hook must come before exit 0: {rc}"
    );
    let fstab = image_file(&raw, "/etc/fstab").expect("fstab in the image");
    assert!(
        !fstab.contains(uuid),
        "data disk in the image's fstab: {fstab}"
    );
    assert!(
        fstab.contains("/dev/vda") || fstab.contains(" / "),
        "the root entry must stay: {fstab}"
    );
    let _ = std::fs::remove_file(&raw);
}

/// The source guest is back as it was: files, data disk mounted with its data.
fn assert_source_restored(g: &Guest, before: &[(String, Option<Vec<u8>>)], d: &Daemon) {
    assert_eq!(
        watched(g),
        before,
        "the source was not restored:\n{}",
        d.log_text()
    );
    assert!(g
        .sh_ok("findmnt -n -o TARGET /mnt/data")
        .contains("/mnt/data"));
    assert_eq!(g.sh_ok("cat /mnt/data/file").trim(), "kept");
}

/// Shutdown mode with prep (the seeds' own flow: prep the VM, shut it down, capture it): the
/// prep runs in the running guest before the shutdown, the image has it, and with `--restart
/// --restore-source` the guest runs again with its own configuration. The same request on a
/// shut-off guest is refused naming what works. A daemon killed while the prepped guest shuts
/// down leaves a journal entry: the restarted daemon starts the guest and undoes the prep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_capture_with_prep_prepares_the_image_restarts_and_restores_the_source() {
    let lab = Lab::get();
    let (g, uuid) = prepared_source(lab, "prepoff");
    let before = watched(&g);
    let mut d = Daemon::start();

    let op = d.imagectl_json(&[
        "capture",
        g.name(),
        "--name",
        "offprep",
        "--mode",
        "shutdown",
        "--prep",
        "all",
        "--restart",
        "--restore-source",
    ]);
    assert_eq!(op["state"], "active", "{op}\n{}", d.log_text());
    assert_eq!(op["consistency"], "cold");
    let reports = op["prep"].as_array().expect("prep reports");
    assert_eq!(reports.len(), 4, "{op}");
    for r in reports {
        assert_eq!(r["outcome"], "restored", "{r}");
    }
    assert_eq!(g.state(), "running", "the guest was not started again");
    g.wait_booted(Duration::from_secs(180));
    assert_source_restored(&g, &before, &d);
    assert_image_prepared(&d, "offprep", &uuid);

    // Prep on a shut-off guest: refused (FAILED_PRECONDITION, exit 4), nothing captured.
    g.shutdown(Duration::from_secs(120));
    let out = d.imagectl(&[
        "capture",
        g.name(),
        "--name",
        "never",
        "--mode",
        "shutdown",
        "--prep",
        "all",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "prep on a shut-off guest was accepted"
    );
    assert!(
        err.contains("shut off") && err.contains("start it and use mode shutdown"),
        "{err}"
    );
    assert_eq!(d.imagectl(&["image", "never"]).status.code(), Some(3));
    g.start();
    g.wait_agent(Duration::from_secs(180));
    g.wait_booted(Duration::from_secs(180));
    assert_source_restored(&g, &before, &d);

    // The daemon is killed while the prepped guest shuts down: the restarted daemon starts
    // the guest again and undoes the prep (from the host's copy: the guest's /run is new).
    let mut images = d.images().await;
    let op = images
        .capture(crate::support::api::proto::CaptureRequest {
            domain: g.name().into(),
            image_name: "killed".into(),
            mode: imaged::proto::CaptureMode::Shutdown as i32,
            prep: vec!["all".into()],
            restart: true,
            restore_source: true,
            ..Default::default()
        })
        .await
        .expect("capture accepted")
        .into_inner();
    let t0 = std::time::Instant::now();
    let mut ops = d.ops().await;
    loop {
        let o = ops
            .get_operation(crate::support::api::proto::GetOperationRequest { id: op.id.clone() })
            .await
            .unwrap()
            .into_inner();
        if !o.prep.is_empty() {
            // The prep is applied; the shutdown begins.
            assert!(
                o.prep
                    .iter()
                    .any(|r| r.outcome == imaged::proto::PrepOutcome::Applied as i32),
                "{:?}",
                o.prep
            );
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no prep report: {o:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    d.kill();
    let journal = d.run_dir().join("journal");
    assert_eq!(
        std::fs::read_dir(&journal).map(|r| r.count()).unwrap_or(0),
        1,
        "the prep and the restart are journaled"
    );
    d.restart();
    assert!(
        d.log_text().contains("prep changes undone in the source"),
        "{}",
        d.log_text()
    );
    assert_eq!(g.state(), "running");
    g.wait_booted(Duration::from_secs(180));
    assert_source_restored(&g, &before, &d);
    assert_eq!(
        std::fs::read_dir(&journal).map(|r| r.count()).unwrap_or(0),
        0,
        "journal entry left after recovery"
    );
    g.destroy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiesced_capture_with_prep_prepares_the_image_and_restores_the_source() {
    let lab = Lab::get();
    let (g, uuid) = prepared_source(lab, "prep");
    let before = watched(&g);

    let d = Daemon::start();
    // Dry run: diffs, nothing changed.
    let plan = d.imagectl_json(&[
        "capture",
        g.name(),
        "--name",
        "unused",
        "--prep",
        "all",
        "--dry-run",
    ]);
    let steps = plan.as_array().unwrap();
    assert_eq!(steps.len(), 4, "{plan}");
    let dhcp = steps.iter().find(|s| s["step"] == "dhcp").unwrap();
    assert_eq!(dhcp["outcome"], "planned");
    assert!(dhcp["changes"].to_string().contains("inet dhcp"), "{dhcp}");
    assert_eq!(watched(&g), before, "a dry run changed the guest");

    // The capture.
    let op = d.imagectl_json(&[
        "capture",
        g.name(),
        "--name",
        "prepped",
        "--mode",
        "quiesce",
        "--prep",
        "all",
        "--restore-source",
    ]);
    assert_eq!(op["state"], "active", "{op}\n{}", d.log_text());
    assert_eq!(op["consistency"], "quiesced");
    let reports = op["prep"].as_array().unwrap();
    for step in [
        "dhcp",
        "udev-net-rules",
        "setpasswd-hook",
        "fstab-data-disks",
    ] {
        let r = reports
            .iter()
            .find(|r| r["step"] == step)
            .unwrap_or_else(|| panic!("no report for {step}: {op}"));
        assert_eq!(r["outcome"], "restored", "{r}");
    }

    // The source is as it was, data disk mounted, guest thawed and running.
    assert_eq!(watched(&g), before, "the source was not restored");
    assert!(g
        .sh_ok("findmnt -n -o TARGET /mnt/data")
        .contains("/mnt/data"));
    assert_eq!(g.sh_ok("cat /mnt/data/file").trim(), "kept");
    assert!(g
        .agent(r#"{"execute":"guest-fsfreeze-status"}"#)
        .contains("thawed"));

    // The image is prepared.
    assert_image_prepared(&d, "prepped", &uuid);

    // And it boots to its guest agent.
    let q = d.dir.path().join("prepped.qcow2");
    d.imagectl_export("prepped", "qcow2", &q);
    let clone = lab.boot_from("prepped-boot", &q);
    clone.destroy();
    g.destroy();
}
