//! The integration tests, one binary: the shared test support (`support`: the libvirt lab, the
//! daemon harness and the remote test servers) compiles once, and the suite links one test
//! executable instead of one per file. Each former `tests/NAME.rs` is the module `NAME` here,
//! so a test is named `NAME::test_name` (`cargo test --test it NAME::` runs one module).
//!
//! Tests of different modules now run side by side (two at a time under `scripts/test.sh`).
//! What they share is made safe for that: lab domains, daemons and temp dirs carry unique
//! names, and the real Glance and S3 servers are guarded by the locks in `support::servers`
//! (shared for ordinary use, exclusive for a test that stops Glance or inspects s3s-fs's
//! on-disk upload state). libvirtd is guarded the same way by `support::libvirtd`: every lab
//! guest and every daemon holds that lock shared without asking, and the tests of `restarts`,
//! which stop libvirtd, hold it exclusively.

mod support;

mod api_v1;
mod capture_e2e;
mod daemon;
mod guest_prep;
mod imagectl_tables;
mod imagerepo;
mod imagerepo_capture;
mod imagerepo_cli;
mod imagerepo_s3;
mod imagerepo_settings;
mod imports;
mod incremental;
mod lab_smoke;
mod live_capture;
mod load;
mod native_reader;
mod nbd_client;
mod prep_capture;
mod python_client;
mod qcow2_encoder;
mod restarts;
mod stream_capture;
mod targets;
mod trust;
