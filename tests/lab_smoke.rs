//! Smoke test of the test lab itself (tests/common/lab.rs and tests/lab/*.sh): a real guest
//! boots under libvirt, its guest agent runs a program, it shuts down through the agent, and it
//! is gone afterwards. Run with `--nocapture` to see the timings.

mod common;

use common::lab::{self, b64_decode, b64_encode, json_str, Json, Lab};
use std::path::Path;
use std::time::{Duration, Instant};

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
        let backing = Json::parse(&info)
            .unwrap()
            .get("backing-filename")
            .and_then(|b| b.as_str().map(str::to_string));
        assert_eq!(
            backing.as_deref(),
            Some(&*lab.base_image().to_string_lossy())
        );

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

#[test]
fn helpers_encode_and_parse() {
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
        assert_eq!(b64_decode(&b64_encode(data)), data);
    }
    assert_eq!(b64_encode(b"foobar"), "Zm9vYmFy");
    assert_eq!(b64_encode(b"fo"), "Zm8=");
    let j = Json::parse(
        r#" {"return": {"exitcode": 0, "out-data": "aGk=\n", "exited": true, "x": [1, null, "\u00e9\n"]}} "#,
    )
    .unwrap();
    let r = j.get("return").unwrap();
    assert_eq!(r.get("exitcode").unwrap().as_i64(), Some(0));
    assert_eq!(r.get("exited").unwrap().as_bool(), Some(true));
    assert_eq!(
        b64_decode(r.get("out-data").unwrap().as_str().unwrap()),
        b"hi"
    );
    assert_eq!(
        r.get("x").unwrap().as_array().unwrap()[2].as_str(),
        Some("é\n")
    );
    assert_eq!(json_str("a\"b\\c\n\u{1}"), r#""a\"b\\c\n\u0001""#);
}
