//! Smoke test of the test lab itself (tests/it/support/lab.rs and tests/lab/*.sh): a real guest
//! boots under libvirt, its guest agent runs a program, it shuts down through the agent, and it
//! is gone afterwards. Run with `--nocapture` to see the timings.

use std::path::Path;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde_json::json;

use crate::support::lab::{self, Lab};

#[test]
fn guest_boots_runs_a_command_and_shuts_down() {
    let t = Instant::now();
    let lab = Lab::get();
    eprintln!(
        "lab ready in {:.1?} (accelerator {})",
        t.elapsed(),
        lab.accel()
    );

    let (name, dir) = {
        let guest = lab.new_guest("smoke");
        let (name, dir) = (guest.name().to_string(), guest.dir().to_path_buf());
        assert!(name.starts_with(lab::DOMAIN_PREFIX), "{name}");
        assert_eq!(guest.state(), "shut off");
        // The system disk is an overlay on the cached base image: a backing chain.
        let info = lab::qemu_img(&[
            "info",
            "--output=json",
            &guest.disk_path().to_string_lossy(),
        ])
        .expect("qemu-img info");
        let info: serde_json::Value = serde_json::from_str(&info).unwrap();
        let backing = info["backing-filename"].as_str();
        assert_eq!(backing, Some(&*lab.base_image().to_string_lossy()));

        let t = Instant::now();
        guest.start();
        let agent_after = guest.wait_agent(Duration::from_secs(180));
        eprintln!("start -> guest-ping answers: {agent_after:.1?}");
        let state = guest.wait_booted(Duration::from_secs(180));
        eprintln!("start -> boot finished ({state}): {:.1?}", t.elapsed());

        let (code, out, err) = guest.exec(&["cat", "/etc/os-release"]);
        assert_eq!(code, 0, "cat failed: {err}");
        assert!(out.contains("bookworm"), "os-release: {out}");

        // Exit code, stderr and stdin travel too.
        let (code, out, err) =
            guest.exec_input(&["sh", "-c", "cat; echo oops >&2; exit 3"], b"in\n");
        assert_eq!((code, out.as_str(), err.as_str()), (3, "in\n", "oops\n"));
        guest.write_file("/tmp/lab-smoke", b"written by the lab\n");
        assert_eq!(guest.read_file("/tmp/lab-smoke"), b"written by the lab\n");
        assert!(guest
            .exec_ok(&["ls", "/etc/network"])
            .contains("interfaces"));

        let took = guest.shutdown(Duration::from_secs(120));
        eprintln!("agent shutdown -> shut off: {took:.1?}");
        assert_eq!(guest.state(), "shut off");
        let console = guest.console_log();
        assert!(
            console.contains("Linux version"),
            "no boot in the console log: {console}"
        );
        (name, dir)
    };

    // Dropped: undefined and its directory removed.
    assert!(
        lab::virsh(&["dominfo", &name]).is_err(),
        "{name} still defined"
    );
    assert!(!Path::new(&dir).exists(), "{} still there", dir.display());
}

/// The lab's shutdown does not depend on the agent answering: with the agent stopped inside
/// the guest, `virsh shutdown --mode agent` fails and the power button takes the guest down (the
/// path taken when the agent's own `shutdown` child is killed by the shutdown it started).
#[test]
fn shutdown_without_an_answering_agent_uses_the_power_button() {
    let lab = Lab::get();
    let guest = lab.guest("noagent-off").create();
    guest.start();
    guest.wait_agent(Duration::from_secs(240));
    guest.wait_booted(Duration::from_secs(240));
    // Stopped two seconds later by a transient timer, once this command's status was read.
    guest.exec_ok(&[
        "systemd-run",
        "--on-active=2",
        "systemctl",
        "stop",
        "qemu-guest-agent",
    ]);
    let t = Instant::now();
    while lab::virsh(&[
        "qemu-agent-command",
        guest.name(),
        r#"{"execute":"guest-ping"}"#,
    ])
    .is_ok()
    {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the agent still answers 60 s after it was stopped"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let took = guest.shutdown(Duration::from_secs(180));
    eprintln!("shutdown by the power button: {took:.1?}");
    assert_eq!(guest.state(), "shut off");
}

#[test]
fn builder_options_define_the_asked_shape() {
    let lab = Lab::get();
    let guest = lab.guest("shape").no_agent().data_disk(64 << 20).create();
    let xml = guest.xml();
    assert!(!xml.contains("org.qemu.guest_agent.0"), "{xml}");
    assert!(xml.contains("<target dev='vdb' bus='virtio'/>"), "{xml}");
    assert_eq!(guest.data_disk_paths().len(), 1);
    let no_disk = lab.guest("nodisk").no_disk().create();
    assert!(!no_disk.xml().contains("<disk"), "no disk expected");
}

/// The lab's side of the guest agent protocol, without a guest: commands are JSON whatever the
/// arguments hold, replies' `return` members and base64 payloads are read back.
#[test]
fn helpers_encode_and_parse() {
    let argv = ["a\"b\\c\n\u{1}", "é", ""];
    let cmd = lab::agent_command("guest-exec", json!({ "path": "sh", "arg": argv }));
    let back: serde_json::Value = serde_json::from_str(&cmd).unwrap();
    assert_eq!(back["execute"], "guest-exec");
    assert_eq!(back["arguments"]["arg"], json!(argv), "{cmd}");
    assert!(cmd.contains(r#""a\"b\\c\n\u0001""#), "{cmd}");

    for data in [
        &b""[..],
        b"f",
        b"fo",
        b"foo",
        b"foob",
        b"fooba",
        b"foobar",
        &[0, 255, 128, 7],
    ] {
        let r = json!({ "exited": true, "exitcode": 0, "out-data": BASE64.encode(data) });
        let (_, out, _) = lab::exec_status(&r).unwrap().unwrap();
        assert_eq!(out.as_bytes(), String::from_utf8_lossy(data).as_bytes());
        assert_eq!(lab::agent_data(&BASE64.encode(data)).unwrap(), data);
    }
    assert_eq!(lab::agent_data("Zm9vYmFy").unwrap(), b"foobar");
    assert_eq!(lab::agent_data("Zm8=").unwrap(), b"fo");

    let r = lab::agent_return(
        r#" {"return": {"exitcode": 3, "out-data": "aGk=", "err-data": "w6kK", "exited": true, "x": [1, null, "\u00e9\n"]}} "#,
    )
    .unwrap();
    assert_eq!(
        lab::exec_status(&r).unwrap(),
        Some((3, "hi".to_string(), "é\n".to_string()))
    );
    assert_eq!(r["x"][2], "é\n");
    // Killed by a signal, still running, truncated output, an error reply.
    let killed = json!({ "exited": true, "signal": 9 });
    assert_eq!(lab::exec_status(&killed).unwrap().unwrap().0, 137);
    assert_eq!(lab::exec_status(&json!({ "exited": false })).unwrap(), None);
    let cut = json!({ "exited": true, "exitcode": 0, "out-truncated": true });
    assert!(lab::exec_status(&cut).is_err());
    assert!(lab::agent_return(r#"{"error": {"class": "GenericError"}}"#).is_err());
}
