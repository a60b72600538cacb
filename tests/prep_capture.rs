//! Issue 3 end to end: a running guest with a static network configuration, persistent-net
//! udev rules, an rc file and a real data disk mounted through fstab is captured in quiesce
//! mode with `--prep all --restore-source` through imagectl. The *image* is prepared (read
//! straight out of the exported ext4 image with debugfs) and boots to its guest agent; the
//! *source* is exactly as it was, data disk mounted.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::daemon::Daemon;
use common::lab::{Guest, Lab, SystemDisk};

const INTERFACES: &str = "auto lo\niface lo inet loopback\n\nauto eth0\niface eth0 inet static\n    address 192.0.2.10\n    netmask 255.255.255.0\n    gateway 192.0.2.1\n";
const UDEV: &str =
    "SUBSYSTEM==\"net\", ACTION==\"add\", ATTR{address}==\"52:54:00:12:34:56\", NAME=\"eth0\"\n";
const RC: &str = "#!/bin/sh\n# rc: runs the scripts of a runlevel\necho starting\nexit 0\n";
const HOOK: &str = "sh /etc/init.d/setpasswd.sh";

fn sh_ok(g: &Guest, script: &str) -> String {
    let (code, out, err) = g.sh(script);
    assert_eq!(code, 0, "{script}: {out}{err}");
    out
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiesced_capture_with_prep_prepares_the_image_and_restores_the_source() {
    let lab = Lab::get();
    let g = lab.guest("prep").data_disk(64 << 20).create();
    g.start();
    g.wait_agent(Duration::from_secs(180));
    g.wait_booted(Duration::from_secs(180));
    // The source: static network, udev rule, rc file, a data disk mounted by UUID.
    g.write_file("/etc/network/interfaces", INTERFACES.as_bytes());
    g.write_file("/etc/udev/rules.d/70-persistent-net.rules", UDEV.as_bytes());
    g.write_file("/etc/init.d/rc", RC.as_bytes());
    sh_ok(
        &g,
        "chmod 755 /etc/init.d/rc && mkfs.ext4 -q /dev/vdb && mkdir -p /mnt/data",
    );
    let uuid = sh_ok(&g, "blkid -s UUID -o value /dev/vdb")
        .trim()
        .to_string();
    sh_ok(&g, &format!("echo 'UUID={uuid} /mnt/data ext4 defaults 0 2' >> /etc/fstab && mount /mnt/data && echo kept > /mnt/data/file && sync"));
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
    assert!(sh_ok(&g, "findmnt -n -o TARGET /mnt/data").contains("/mnt/data"));
    assert_eq!(sh_ok(&g, "cat /mnt/data/file").trim(), "kept");
    assert!(g
        .agent(r#"{"execute":"guest-fsfreeze-status"}"#)
        .contains("thawed"));

    // The image is prepared.
    let raw = d.dir.path().join("prepped.raw");
    assert_eq!(
        d.imagectl_json(&[
            "export",
            "prepped",
            "--format",
            "raw",
            "-o",
            raw.to_str().unwrap()
        ])["state"],
        "active"
    );
    let ifaces = image_file(&raw, "/etc/network/interfaces").expect("interfaces in the image");
    assert!(
        ifaces.contains("iface eth0 inet dhcp") && !ifaces.contains("192.0.2.10"),
        "{ifaces}"
    );
    assert!(ifaces.contains("iface lo inet loopback"), "{ifaces}");
    assert!(
        image_file(&raw, "/etc/udev/rules.d/70-persistent-net.rules").is_none(),
        "udev rule still in the image"
    );
    let rc = image_file(&raw, "/etc/init.d/rc").expect("rc in the image");
    assert_eq!(rc.matches(HOOK).count(), 1, "{rc}");
    assert!(
        rc.find(HOOK).unwrap() < rc.rfind("exit 0").unwrap(),
        "the hook must come before exit 0: {rc}"
    );
    let fstab = image_file(&raw, "/etc/fstab").expect("fstab in the image");
    assert!(
        !fstab.contains(&uuid),
        "the data disk is still in the image's fstab: {fstab}"
    );
    assert!(
        fstab.contains("/dev/vda") || fstab.contains(" / "),
        "the root entry must stay: {fstab}"
    );

    // And it boots to its guest agent.
    let q = d.dir.path().join("prepped.qcow2");
    assert_eq!(
        d.imagectl_json(&[
            "export",
            "prepped",
            "--format",
            "qcow2",
            "-o",
            q.to_str().unwrap()
        ])["state"],
        "active"
    );
    let clone = lab
        .guest("prepped-boot")
        .system_disk(SystemDisk::Qcow2)
        .create();
    std::fs::copy(&q, clone.disk_path()).unwrap();
    clone.start();
    clone.wait_agent(Duration::from_secs(180));
    clone.destroy();
    g.destroy();
}
