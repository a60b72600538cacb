//! The [`Controller`]'s actions driven against the in-memory [`FakeHypervisor`]: each test states
//! an action's preconditions (the table in this module's parent) and checks that a request
//! breaking one is refused with the right error kind before anything is started, and that a
//! request meeting them all is accepted.
//!
//! Accepted captures, imports and exports become operations that wait for a run slot: the
//! controller here has none (`max_running_operations = 0`), so nothing is read and each
//! accepted operation is cancelled and must end CANCELLED, having touched no guest and left no
//! image. The data path is tested elsewhere, with real parts.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::mode::{decide, needs_agent, AgentState, Asked, Facts};
use super::*;
use crate::hypervisor::fake::{Call, FakeAgent, FakeDomain, FakeHypervisor, Step};
use crate::hypervisor::DomainState;
use crate::repo::manifest::content_digest;
use crate::repo::CHUNK_SIZE;

/// A controller over `hv` with a repository and run directory in a temporary directory, and
/// no run slot: accepted operations stay QUEUED until cancelled.
struct World {
    ctl: Controller,
    hv: FakeHypervisor,
    dir: tempfile::TempDir,
}

impl World {
    fn new(domains: Vec<FakeDomain>) -> World {
        World::with_config(domains, |_| {})
    }

    /// A world whose config `edit` changes first.
    fn with_config(domains: Vec<FakeDomain>, edit: impl FnOnce(&mut Config)) -> World {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config::default();
        cfg.daemon.max_running_operations = 0;
        cfg.capture.run_dir = dir.path().join("run");
        cfg.daemon.state_dir = dir.path().join("state");
        // Imports and exports of these tests live in the temp dir.
        let real = std::fs::canonicalize(dir.path()).unwrap();
        cfg.paths.import_dirs = vec![real.clone()];
        cfg.paths.export_dirs = vec![real];
        edit(&mut cfg);
        let repo = Repository::open(&dir.path().join("repo")).unwrap();
        let hv = FakeHypervisor::new(domains);
        let ctl = Controller::open(cfg, Arc::new(hv.clone()), repo).unwrap();
        World { ctl, hv, dir }
    }

    /// A readable disk file for a domain.
    fn disk(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(format!("{name}.qcow2"));
        std::fs::write(&p, b"").unwrap();
        p
    }

    /// A domain whose system disk is a readable file.
    fn domain(&self, name: &str, state: DomainState) -> FakeDomain {
        FakeDomain::new(name, state).disk_path(&self.disk(name))
    }

    /// Cancels an accepted operation and checks it ends CANCELLED with nothing done.
    async fn cancel_accepted(&self, op: &Operation) {
        assert_eq!(op.state, OpState::Queued, "{op:?}");
        self.ctl.cancel(&op.id).unwrap();
        let mut rx = self.ctl.watch(&op.id).unwrap().subscribe();
        tokio::time::timeout(
            Duration::from_secs(10),
            rx.wait_for(|s| s.state.is_terminal()),
        )
        .await
        .expect("the cancelled operation ends")
        .unwrap();
        assert_eq!(
            self.ctl.operation(&op.id).unwrap().state,
            OpState::Cancelled
        );
        assert_eq!(self.hv.calls(), vec![], "nothing ran in any guest");
        assert_eq!(
            kind(self.ctl.image(&op.image_name).await),
            ErrorKind::NotFound,
            "no image left"
        );
    }

    /// An image in the repository (all zeros, so no chunk to store).
    fn image(&self, name: &str) {
        let w = self.ctl.repository().begin_image(name).unwrap();
        let mut rec = ImageRecord::blank(name, CHUNK_SIZE, Vec::new());
        rec.id = format!("id-{name}");
        rec.content_digest = content_digest(CHUNK_SIZE, &[]);
        w.commit(&rec).unwrap();
    }
}

fn kind<T: std::fmt::Debug>(r: Result<T>) -> ErrorKind {
    r.expect_err("refused").kind()
}

fn capture(domain: &str, mode: Mode) -> CaptureParams {
    CaptureParams {
        domain: domain.into(),
        image_name: format!("{domain}-img"),
        mode,
        ..CaptureParams::default()
    }
}

// ------------------------------------------------------------------------------- domains

#[tokio::test]
async fn domains_are_listed_by_name_and_an_unknown_one_is_not_found() {
    let w = World::new(vec![]);
    w.hv.add(FakeDomain::new("web", DomainState::Running));
    w.hv.add(FakeDomain::new("db", DomainState::ShutOff));
    let names: Vec<String> = w
        .ctl
        .list_domains()
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.name)
        .collect();
    assert_eq!(names, ["db", "web"]);
    assert_eq!(
        w.ctl.domain("web").await.unwrap().state,
        DomainState::Running
    );
    assert_eq!(kind(w.ctl.domain("nope").await), ErrorKind::NotFound);
    assert_eq!(kind(w.ctl.domain("").await), ErrorKind::InvalidArgument);
}

// ------------------------------------------------------------------------------- capture

/// How a test domain's guest agent is set up.
#[derive(Debug, Clone, Copy)]
enum Agent {
    Absent,
    Linux,
    Windows,
    Unreachable,
}

/// Every state libvirt reports.
const STATES: [DomainState; 8] = [
    DomainState::NoState,
    DomainState::Running,
    DomainState::Blocked,
    DomainState::Paused,
    DomainState::ShuttingDown,
    DomainState::ShutOff,
    DomainState::Crashed,
    DomainState::Suspended,
];
const AGENTS: [Agent; 4] = [
    Agent::Absent,
    Agent::Linux,
    Agent::Windows,
    Agent::Unreachable,
];

/// What the controller should learn from probing the agent, as [`decide`] takes it.
fn agent_state(asked: &Asked, state: DomainState, agent: Agent) -> AgentState {
    let channel = !matches!(agent, Agent::Absent);
    if !channel {
        AgentState::NoChannel
    } else if !needs_agent(asked, state, channel) {
        AgentState::NotAsked
    } else if state != DomainState::Running {
        AgentState::Silent // a paused guest's agent does not answer
    } else {
        match agent {
            Agent::Linux => AgentState::Linux,
            Agent::Windows => AgentState::Windows,
            _ => AgentState::Silent,
        }
    }
}

/// Every mode × state × agent × option combination goes through [`Controller::capture`] and
/// gets the verdict of [`decide`] (the mode table's oracle, tested on its own in `mode.rs`):
/// the same refusal kind, or an accepted operation that does nothing until it runs.
#[tokio::test]
async fn capture_agrees_with_the_mode_table_over_modes_states_agents_and_options() {
    let opts = [
        (false, false, false, false),
        (true, false, false, false),
        (true, true, false, false),
        (true, true, true, false),
        (false, false, true, false),
        (false, false, false, true),
        (false, true, false, false),
    ];
    let mut checked = 0;
    let w = World::new(vec![]);
    for mode in Mode::ALL {
        for state in STATES {
            for agent in AGENTS {
                for (prep, restore_source, restart, force_off) in opts {
                    let mut d = w.domain("vm", state);
                    d = match agent {
                        Agent::Absent => d.no_agent_channel(),
                        Agent::Linux => d.agent(FakeAgent::Linux),
                        Agent::Windows => d.agent(FakeAgent::Windows),
                        Agent::Unreachable => d.agent(FakeAgent::Unreachable),
                    };
                    w.hv.add(d);
                    let asked = Asked {
                        mode,
                        prep,
                        restore_source,
                        restart,
                        force_off,
                    };
                    let facts = Facts {
                        domain: "vm",
                        state,
                        has_agent_channel: !matches!(agent, Agent::Absent),
                        agent: agent_state(&asked, state, agent),
                    };
                    let expected = decide(&asked, &facts);
                    let p = CaptureParams {
                        prep: if prep {
                            vec!["udev-net-rules".into()]
                        } else {
                            vec![]
                        },
                        restore_source,
                        restart,
                        force_off,
                        ..capture("vm", mode)
                    };
                    let case = format!("{mode:?} {state:?} {agent:?} {asked:?}");
                    match (expected, w.ctl.capture(p).await) {
                        (Ok(_), Ok(op)) => {
                            assert_eq!(op.kind, OpKind::Capture, "{case}");
                            w.cancel_accepted(&op).await;
                        }
                        (Err(e), Err(got)) => {
                            assert_eq!(got.kind(), e.kind(), "{case}: {got}");
                            assert_eq!(got.to_string(), e.to_string(), "{case}");
                            assert_eq!(w.hv.calls(), vec![], "{case}: refused, nothing done");
                        }
                        (e, got) => panic!("{case}: expected {e:?}, got {got:?}"),
                    }
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 5 * 8 * 4 * 7);
}

/// The rows a reader looks for, spelled out.
#[tokio::test]
async fn capture_refusals_name_the_precondition() {
    use ErrorKind::*;
    let cases: &[(&str, DomainState, Agent, Mode, bool, bool, ErrorKind)] = &[
        // (what, state, agent, mode, prep, restart, expected)
        (
            "cold needs shut off",
            DomainState::Running,
            Agent::Linux,
            Mode::Cold,
            false,
            false,
            FailedPrecondition,
        ),
        (
            "cold takes no prep",
            DomainState::ShutOff,
            Agent::Linux,
            Mode::Cold,
            true,
            false,
            InvalidArgument,
        ),
        (
            "cold takes no restart",
            DomainState::ShutOff,
            Agent::Linux,
            Mode::Cold,
            false,
            true,
            InvalidArgument,
        ),
        (
            "quiesce needs an agent channel",
            DomainState::Running,
            Agent::Absent,
            Mode::Quiesce,
            false,
            false,
            FailedPrecondition,
        ),
        (
            "quiesce needs an answering agent",
            DomainState::Running,
            Agent::Unreachable,
            Mode::Quiesce,
            false,
            false,
            FailedPrecondition,
        ),
        (
            "quiesce refuses Windows",
            DomainState::Running,
            Agent::Windows,
            Mode::Quiesce,
            false,
            false,
            FailedPrecondition,
        ),
        (
            "quiesce needs it running",
            DomainState::ShutOff,
            Agent::Linux,
            Mode::Quiesce,
            false,
            false,
            FailedPrecondition,
        ),
        (
            "crash-consistent takes no prep",
            DomainState::Running,
            Agent::Linux,
            Mode::CrashConsistent,
            true,
            false,
            InvalidArgument,
        ),
        (
            "crash-consistent needs it running",
            DomainState::ShutOff,
            Agent::Linux,
            Mode::CrashConsistent,
            false,
            false,
            FailedPrecondition,
        ),
        (
            "shutdown of a crashed guest",
            DomainState::Crashed,
            Agent::Linux,
            Mode::Shutdown,
            false,
            false,
            FailedPrecondition,
        ),
        (
            "shutdown prep on a shut-off guest",
            DomainState::ShutOff,
            Agent::Linux,
            Mode::Shutdown,
            true,
            false,
            FailedPrecondition,
        ),
        (
            "auto with a silent agent",
            DomainState::Running,
            Agent::Unreachable,
            Mode::Auto,
            false,
            false,
            FailedPrecondition,
        ),
        (
            "auto on a paused guest",
            DomainState::Paused,
            Agent::Linux,
            Mode::Auto,
            false,
            false,
            FailedPrecondition,
        ),
    ];
    for (what, state, agent, mode, prep, restart, expected) in cases {
        let w = World::new(vec![]);
        let mut d = w.domain("vm", *state);
        d = match agent {
            Agent::Absent => d.no_agent_channel(),
            Agent::Linux => d,
            Agent::Windows => d.agent(FakeAgent::Windows),
            Agent::Unreachable => d.agent(FakeAgent::Unreachable),
        };
        w.hv.add(d);
        let p = CaptureParams {
            prep: if *prep { vec!["dhcp".into()] } else { vec![] },
            restart: *restart,
            ..capture("vm", *mode)
        };
        assert_eq!(kind(w.ctl.capture(p).await), *expected, "{what}");
        assert_eq!(w.hv.calls(), vec![], "{what}: nothing done");
    }
}

#[tokio::test]
async fn capture_accepts_each_mode_where_its_preconditions_hold() {
    let cases = [
        (DomainState::ShutOff, FakeAgent::Linux, Mode::Cold, "cold"),
        (DomainState::ShutOff, FakeAgent::Linux, Mode::Auto, "cold"),
        (
            DomainState::ShutOff,
            FakeAgent::Linux,
            Mode::Shutdown,
            "cold",
        ),
        (
            DomainState::Running,
            FakeAgent::Linux,
            Mode::Shutdown,
            "cold",
        ),
        (DomainState::Running, FakeAgent::Windows, Mode::Auto, "cold"),
        (
            DomainState::Running,
            FakeAgent::Linux,
            Mode::Quiesce,
            "quiesced",
        ),
        (
            DomainState::Running,
            FakeAgent::Linux,
            Mode::Auto,
            "quiesced",
        ),
        (
            DomainState::Running,
            FakeAgent::Unreachable,
            Mode::CrashConsistent,
            "crash-consistent",
        ),
    ];
    for (state, agent, mode, consistency) in cases {
        let w = World::new(vec![]);
        w.hv.add(w.domain("vm", state).agent(agent));
        let op = w.ctl.capture(capture("vm", mode)).await.unwrap();
        assert_eq!(op.consistency, consistency, "{mode:?} {state:?}");
        assert_eq!(op.domain, "vm");
        w.cancel_accepted(&op).await;
    }
    // Options: prep + restore_source + restart in shutdown mode; force_off.
    let w = World::new(vec![]);
    w.hv.add(w.domain("vm", DomainState::Running));
    let p = CaptureParams {
        prep: vec!["all".into()],
        restore_source: true,
        restart: true,
        force_off: true,
        ..capture("vm", Mode::Shutdown)
    };
    let op = w.ctl.capture(p).await.unwrap();
    w.cancel_accepted(&op).await;
}

#[tokio::test]
async fn capture_checks_the_domain_disk_name_target_and_lock() {
    use ErrorKind::*;
    let w = World::new(vec![]);
    w.hv.add(w.domain("vm", DomainState::ShutOff));
    // Unknown domain, unknown disk.
    assert_eq!(
        kind(w.ctl.capture(capture("nope", Mode::Cold)).await),
        NotFound
    );
    let p = CaptureParams {
        disk: Some("vdz".into()),
        ..capture("vm", Mode::Cold)
    };
    assert_eq!(kind(w.ctl.capture(p).await), NotFound);
    // Bad image name; unknown prep step; unknown remote target; relative file target.
    let p = CaptureParams {
        image_name: "-bad".into(),
        ..capture("vm", Mode::Cold)
    };
    assert_eq!(kind(w.ctl.capture(p).await), InvalidArgument);
    let p = CaptureParams {
        prep: vec!["no-such-step".into()],
        ..capture("vm", Mode::Shutdown)
    };
    assert_eq!(kind(w.ctl.capture(p).await), InvalidArgument);
    let p = CaptureParams {
        target: TargetSpec::Remote {
            name: "glance".into(),
            format: Some(Format::Qcow2),
            project: None,
            tag: None,
        },
        ..capture("vm", Mode::Cold)
    };
    assert_eq!(kind(w.ctl.capture(p).await), NotFound);
    // The disk file must be readable for a cold read.
    w.hv.add(FakeDomain::new("gone", DomainState::ShutOff).disk_path(Path::new("/nonexistent/x")));
    assert_eq!(
        kind(w.ctl.capture(capture("gone", Mode::Cold)).await),
        FailedPrecondition
    );
    // A disk with no local path cannot be captured.
    let mut net = FakeDomain::new("net", DomainState::ShutOff);
    net.info.disks[0].source_type = "network".into();
    net.info.disks[0].path = String::new();
    w.hv.add(net);
    assert_eq!(
        kind(w.ctl.capture(capture("net", Mode::Cold)).await),
        FailedPrecondition
    );
    // A domain with no system disk.
    let mut bare = FakeDomain::new("bare", DomainState::ShutOff);
    bare.info.disks.clear();
    w.hv.add(bare);
    assert_eq!(
        kind(w.ctl.capture(capture("bare", Mode::Cold)).await),
        FailedPrecondition
    );
    // One operation holds a domain; a taken image name is refused; a retry is the same op.
    let first = CaptureParams {
        request_id: "r1".into(),
        ..capture("vm", Mode::Cold)
    };
    let op = w.ctl.capture(first.clone()).await.unwrap();
    assert_eq!(w.ctl.capture(first.clone()).await.unwrap().id, op.id);
    let other = CaptureParams {
        image_name: "other".into(),
        ..capture("vm", Mode::Cold)
    };
    assert_eq!(kind(w.ctl.capture(other).await), Aborted);
    let changed = CaptureParams {
        image_name: "changed".into(),
        ..first
    };
    assert_eq!(kind(w.ctl.capture(changed).await), InvalidArgument);
    w.cancel_accepted(&op).await;
    w.image("taken");
    let p = CaptureParams {
        image_name: "taken".into(),
        ..capture("vm", Mode::Cold)
    };
    assert_eq!(kind(w.ctl.capture(p).await), AlreadyExists);
}

// ------------------------------------------------------------------------------- prep

#[tokio::test]
async fn remote_target_fields_must_suit_the_targets_kind() {
    use ErrorKind::*;
    let sock = std::env::temp_dir().join(format!("imaged-no-repo-{}.sock", std::process::id()));
    let targets = format!(
        "[targets.gl]\nkind = \"glance\"\nendpoint = \"http://127.0.0.1:1\"\n\
         [targets.gl.auth.headers]\nX-Identity-Status = \"Confirmed\"\n\
         [targets.central]\nkind = \"imagerepo\"\naddress = \"unix:{}\"\nconnect_timeout_secs = 1\n",
        sock.display()
    );
    let parsed = Config::parse(&targets).unwrap();
    let w = World::with_config(vec![], |cfg| cfg.targets = parsed.targets);
    w.hv.add(w.domain("vm", DomainState::ShutOff));
    let to = |name: &str, format: Option<Format>, project: Option<&str>, tag: Option<&str>| {
        CaptureParams {
            target: TargetSpec::Remote {
                name: name.into(),
                format,
                project: project.map(Into::into),
                tag: tag.map(Into::into),
            },
            ..capture("vm", Mode::Cold)
        }
    };
    // Glance and S3 take a format, never a project or a tag.
    for p in [
        to("gl", Some(Format::Qcow2), Some("p1"), None),
        to("gl", None, None, Some("v1")),
    ] {
        let e = w.ctl.capture(p).await.unwrap_err();
        assert_eq!(e.kind(), InvalidArgument, "{e}");
        assert!(e.to_string().contains("glance target"), "{e}");
    }
    // An imagerepo takes a project and a tag, never a format.
    let e = w
        .ctl
        .capture(to("central", Some(Format::Raw), Some("p1"), None))
        .await
        .unwrap_err();
    assert_eq!(
        (e.kind(), e.facts().field.as_str()),
        (InvalidArgument, "target.remote.format")
    );
    // No project anywhere: named.
    let e = w
        .ctl
        .capture(to("central", None, None, None))
        .await
        .unwrap_err();
    assert_eq!(
        (e.kind(), e.facts().field.as_str()),
        (InvalidArgument, "target.remote.project")
    );
    let e = w
        .ctl
        .capture(to("central", None, Some("p1"), Some("-bad")))
        .await
        .unwrap_err();
    assert_eq!(
        (e.kind(), e.facts().field.as_str()),
        (InvalidArgument, "target.remote.tag")
    );
    // Nothing listens at the address: UNAVAILABLE before the operation exists, naming both.
    let e = w
        .ctl
        .capture(to("central", None, Some("p1"), Some("v1")))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), Unavailable, "{e}");
    assert!(e.to_string().contains("target central"), "{e}");
    assert!(e.to_string().contains(&sock.display().to_string()), "{e}");
    assert!(w.ctl.operations().unwrap().is_empty());
}

#[tokio::test]
async fn plan_prep_needs_steps_a_running_domain_and_its_agent() {
    use ErrorKind::*;
    let w = World::new(vec![
        FakeDomain::new("up", DomainState::Running),
        FakeDomain::new("off", DomainState::ShutOff),
        FakeDomain::new("paused", DomainState::Paused),
        FakeDomain::new("bare", DomainState::Running).no_agent_channel(),
        FakeDomain::new("silent", DomainState::Running).agent(FakeAgent::Unreachable),
    ]);
    let steps = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let udev = steps(&["udev-net-rules"]);
    assert_eq!(kind(w.ctl.plan_prep("up", &[]).await), InvalidArgument);
    assert_eq!(
        kind(w.ctl.plan_prep("up", &steps(&["nope"])).await),
        InvalidArgument
    );
    assert_eq!(kind(w.ctl.plan_prep("nope", &udev).await), NotFound);
    assert_eq!(
        kind(w.ctl.plan_prep("off", &udev).await),
        FailedPrecondition
    );
    assert_eq!(
        kind(w.ctl.plan_prep("paused", &udev).await),
        FailedPrecondition
    );
    assert_eq!(
        kind(w.ctl.plan_prep("bare", &udev).await),
        FailedPrecondition
    );
    assert_eq!(
        kind(w.ctl.plan_prep("silent", &udev).await),
        FailedPrecondition
    );
    let plans = w.ctl.plan_prep("up", &udev).await.unwrap();
    assert_eq!(plans.len(), 1);
    assert_eq!(plans[0].step, "udev-net-rules");
    assert_eq!(plans[0].outcome, "unchanged");
    assert_eq!(w.hv.calls(), vec![], "a dry run changes nothing");
}

// ------------------------------------------------------------------------------- images

#[tokio::test]
async fn import_checks_name_path_format_and_file() {
    use ErrorKind::*;
    let w = World::new(vec![]);
    let file = w.dir.path().join("disk.raw");
    std::fs::write(&file, vec![0u8; 1 << 20]).unwrap();
    let p = |name: &str, path: &Path, format: &str| ImportParams {
        path: path.to_path_buf(),
        format: format.into(),
        image_name: name.into(),
        request_id: String::new(),
        description: String::new(),
        requester: String::new(),
    };
    assert_eq!(
        kind(w.ctl.import(p("-x", &file, "raw")).await),
        InvalidArgument
    );
    assert_eq!(
        kind(w.ctl.import(p("a", Path::new("disk.raw"), "raw")).await),
        InvalidArgument
    );
    assert_eq!(
        kind(w.ctl.import(p("a", &file, "vmdk")).await),
        InvalidArgument
    );
    let missing = w.dir.path().join("missing.raw");
    assert_eq!(
        kind(w.ctl.import(p("a", &missing, "raw")).await),
        FailedPrecondition
    );
    let empty = w.dir.path().join("empty.raw");
    std::fs::write(&empty, b"").unwrap();
    assert!(
        w.ctl.import(p("a", &empty, "raw")).await.is_err(),
        "an empty file"
    );
    let link = w.dir.path().join("link.raw");
    std::os::unix::fs::symlink(&file, &link).unwrap();
    assert!(
        w.ctl.import(p("a", &link, "raw")).await.is_err(),
        "a symbolic link"
    );
    assert!(
        w.ctl.import(p("a", w.dir.path(), "raw")).await.is_err(),
        "a directory"
    );
    w.image("taken");
    assert_eq!(
        kind(w.ctl.import(p("taken", &file, "raw")).await),
        AlreadyExists
    );
    let op = w.ctl.import(p("fresh", &file, "raw")).await.unwrap();
    assert_eq!(op.kind, OpKind::Import);
    w.cancel_accepted(&op).await;
}

#[tokio::test]
async fn export_delete_and_image_need_the_image() {
    use ErrorKind::*;
    let w = World::new(vec![]);
    let dest = w.dir.path().join("out.qcow2");
    let p = |name: &str, path: &Path, overwrite: bool| ExportParams {
        image_name: name.into(),
        format: Format::Qcow2,
        path: path.to_path_buf(),
        overwrite,
        request_id: String::new(),
        requester: String::new(),
    };
    assert_eq!(kind(w.ctl.export(p("nope", &dest, false)).await), NotFound);
    assert_eq!(kind(w.ctl.image("nope").await), NotFound);
    assert_eq!(kind(w.ctl.delete_image("nope").await), NotFound);
    w.image("img");
    assert_eq!(
        kind(w.ctl.export(p("-x", &dest, false)).await),
        InvalidArgument
    );
    assert_eq!(
        kind(w.ctl.export(p("img", Path::new("out"), false)).await),
        InvalidArgument
    );
    let nodir = w.dir.path().join("no/such/dir/out");
    assert!(
        w.ctl.export(p("img", &nodir, false)).await.is_err(),
        "a missing directory"
    );
    std::fs::write(&dest, b"x").unwrap();
    assert!(
        w.ctl.export(p("img", &dest, false)).await.is_err(),
        "an existing file"
    );
    let op = w.ctl.export(p("img", &dest, true)).await.unwrap();
    assert_eq!(op.kind, OpKind::Export);
    // An export reads the image: it cannot be deleted meanwhile.
    assert!(w.ctl.delete_image("img").await.is_err());
    w.ctl.cancel(&op.id).unwrap();
    let mut rx = w.ctl.watch(&op.id).unwrap().subscribe();
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        rx.wait_for(|s| s.state.is_terminal()),
    )
    .await;
    // The reader is released when the task ends.
    let mut deleted = w.ctl.delete_image("img").await;
    for _ in 0..50 {
        if deleted.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        deleted = w.ctl.delete_image("img").await;
    }
    deleted.unwrap();
    assert!(w.ctl.list_images().await.unwrap().is_empty());
}

// ------------------------------------------------------------------------------- operations

#[tokio::test]
async fn operations_are_known_and_cancel_only_a_running_one() {
    use ErrorKind::*;
    let w = World::new(vec![]);
    assert_eq!(kind(w.ctl.operation("op-nope")), NotFound);
    assert_eq!(kind(w.ctl.watch("op-nope").map(|_| ())), NotFound);
    assert_eq!(kind(w.ctl.cancel("op-nope")), NotFound);
    w.hv.add(w.domain("vm", DomainState::ShutOff));
    let op = w.ctl.capture(capture("vm", Mode::Cold)).await.unwrap();
    assert_eq!(w.ctl.operations().unwrap().len(), 1);
    w.cancel_accepted(&op).await;
    assert_eq!(kind(w.ctl.cancel(&op.id)), FailedPrecondition);
}

// ------------------------------------------------------------------------------- durability

impl World {
    /// A controller over the same state directory, repository and run directory, as a daemon
    /// started again finds them (the first one is not told: as if its process had died).
    fn restarted(&self) -> Controller {
        let mut cfg = Config::default();
        cfg.daemon.max_running_operations = 0;
        cfg.capture.run_dir = self.dir.path().join("run");
        cfg.daemon.state_dir = self.dir.path().join("state");
        let real = std::fs::canonicalize(self.dir.path()).unwrap();
        cfg.paths.import_dirs = vec![real.clone()];
        cfg.paths.export_dirs = vec![real];
        let repo = Repository::open(&self.dir.path().join("repo")).unwrap();
        Controller::open(cfg, Arc::new(self.hv.clone()), repo).unwrap()
    }

    /// An import request of a small raw file.
    fn import_params(&self, name: &str, request_id: &str) -> ImportParams {
        let file = self.dir.path().join("disk.raw");
        if !file.exists() {
            std::fs::write(&file, vec![0u8; 1 << 20]).unwrap();
        }
        ImportParams {
            path: file,
            format: "raw".into(),
            image_name: name.into(),
            request_id: request_id.into(),
            description: String::new(),
            requester: String::new(),
        }
    }
}

/// An ended operation, and its request_id, outlive the controller (a restart of the daemon);
/// the same request_id with other parameters is still refused.
#[tokio::test]
async fn ended_operations_and_their_request_ids_survive_a_restart() {
    let w = World::new(vec![]);
    let op = w.ctl.import(w.import_params("a", "req-1")).await.unwrap();
    w.cancel_accepted(&op).await;
    let ended = w.ctl.operation(&op.id).unwrap();
    let ctl = w.restarted();
    assert_eq!(ctl.operation(&op.id).unwrap(), ended);
    assert_eq!(ctl.operations().unwrap(), vec![ended.clone()]);
    assert_eq!(
        ctl.watch(&op.id).unwrap().snapshot(),
        ended,
        "a watch of an ended operation shows how it ended"
    );
    let again = ctl.import(w.import_params("a", "req-1")).await.unwrap();
    assert_eq!(again, ended, "the retry returns the first call's operation");
    let other = ctl.import(w.import_params("b", "req-1")).await;
    let e = other.expect_err("other parameters");
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(e.to_string().contains("req-1"), "{e}");
    assert_eq!(kind(ctl.cancel(&op.id)), ErrorKind::FailedPrecondition);
}

/// An operation the previous process left QUEUED is FAILED (ABORTED) at start, saying what
/// happened; a retry with its request_id returns it; a new request_id starts again.
#[tokio::test]
async fn an_interrupted_operation_is_failed_at_start_with_the_reason() {
    let w = World::new(vec![]);
    let op = w.ctl.import(w.import_params("a", "req-1")).await.unwrap();
    assert_eq!(op.state, OpState::Queued);
    let ctl = w.restarted();
    let after = ctl.operation(&op.id).unwrap();
    assert_eq!(after.state, OpState::Failed);
    let err = after.error.clone().unwrap();
    assert_eq!(err.kind, ErrorKind::Aborted);
    for part in [
        &format!("pid {}", std::process::id()),
        "was QUEUED",
        "no image a was kept",
        "same request_id returns this operation",
    ] {
        assert!(err.message.contains(part), "{part:?} in {}", err.message);
    }
    assert!(
        ctl.operations()
            .unwrap()
            .iter()
            .all(|o| o.state.is_terminal()),
        "nothing shown running"
    );
    let retry = ctl.import(w.import_params("a", "req-1")).await.unwrap();
    assert_eq!(
        retry, after,
        "the same request_id returns the failed operation"
    );
    let fresh = ctl.import(w.import_params("a", "req-2")).await.unwrap();
    assert_ne!(fresh.id, op.id);
    assert_eq!(fresh.state, OpState::Queued);
    // The first process's task ends later: its end does not overwrite the recorded one.
    w.ctl.cancel(&op.id).unwrap();
    w.ctl
        .wait_operation(&op.id, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(ctl.operation(&op.id).unwrap(), after);
    ctl.cancel(&fresh.id).unwrap();
}

/// An import the previous process left unfinished whose image is in the repository had
/// committed it: it is ACTIVE, not FAILED.
#[tokio::test]
async fn an_interrupted_import_whose_image_was_committed_is_active() {
    let w = World::new(vec![]);
    let op = w.ctl.import(w.import_params("done", "")).await.unwrap();
    // The commit, seen through another handle of the repository (the name is reserved in
    // the first one's memory only).
    let repo = Repository::open(&w.dir.path().join("repo")).unwrap();
    let writer = repo.begin_image("done").unwrap();
    let mut rec = ImageRecord::blank("done", CHUNK_SIZE, Vec::new());
    rec.id = "id-done".into();
    rec.content_digest = content_digest(CHUNK_SIZE, &[]);
    writer.commit(&rec).unwrap();
    let ctl = w.restarted();
    let after = ctl.operation(&op.id).unwrap();
    assert_eq!(after.state, OpState::Active, "{after:?}");
    assert_eq!((after.error, after.location.as_str()), (None, "done"));
    w.ctl.cancel(&op.id).unwrap();
}

/// An interrupted capture says what start-up recovery did to its domain: all done when its
/// journal entry is gone, still under way (a janitor) when it is there.
#[tokio::test]
async fn an_interrupted_capture_tells_what_recovery_did_to_the_domain() {
    use super::journal::{Entry, Journal};
    let w = World::new(vec![]);
    w.hv.add(w.domain("vm", DomainState::ShutOff));
    w.hv.add(w.domain("db", DomainState::ShutOff));
    let done = w.ctl.capture(capture("vm", Mode::Cold)).await.unwrap();
    let pending = w.ctl.capture(capture("db", Mode::Cold)).await.unwrap();
    let mut e = Entry::new(&pending.id, "db");
    e.restart = true;
    Journal::new(&w.dir.path().join("run")).write(&e).unwrap();
    let ctl = w.restarted();
    let msg = |id: &str| ctl.operation(id).unwrap().error.unwrap().message;
    assert!(
        msg(&done.id)
            .contains("start-up recovery has undone whatever it had recorded doing to domain vm"),
        "{}",
        msg(&done.id)
    );
    assert!(
        msg(&pending.id).contains("not all confirmed undone yet: a janitor keeps trying"),
        "{}",
        msg(&pending.id)
    );
    for op in [&done, &pending] {
        w.ctl.cancel(&op.id).unwrap();
    }
}

/// Delete takes only an ended operation (FAILED_PRECONDITION naming the state of a running
/// one, NOT_FOUND for an unknown one); wait returns at the end, or at its timeout with the
/// operation as it is.
#[tokio::test]
async fn delete_needs_an_ended_operation_and_wait_returns_at_the_end_or_the_timeout() {
    use ErrorKind::*;
    let w = World::new(vec![]);
    assert_eq!(kind(w.ctl.delete_operation("op-nope")), NotFound);
    assert_eq!(
        kind(w.ctl.wait_operation("op-nope", Duration::ZERO).await),
        NotFound
    );
    let op = w.ctl.import(w.import_params("a", "req-1")).await.unwrap();
    let e = w.ctl.delete_operation(&op.id).unwrap_err();
    assert_eq!(e.kind(), FailedPrecondition);
    assert!(
        e.to_string().contains(&op.id) && e.to_string().contains("QUEUED"),
        "{e}"
    );
    let t0 = std::time::Instant::now();
    let waited = w
        .ctl
        .wait_operation(&op.id, Duration::from_millis(300))
        .await
        .unwrap();
    assert_eq!(waited.state, OpState::Queued);
    assert!(t0.elapsed() >= Duration::from_millis(300));
    let ctl = w.ctl.clone();
    let id = op.id.clone();
    let waiter =
        tokio::spawn(async move { ctl.wait_operation(&id, Duration::from_secs(60)).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    w.ctl.cancel(&op.id).unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the wait ends with the operation")
        .unwrap()
        .unwrap();
    assert_eq!(ended.state, OpState::Cancelled);
    assert_eq!(
        w.ctl
            .wait_operation(&op.id, Duration::from_secs(60))
            .await
            .unwrap(),
        ended,
        "an ended operation is returned at once"
    );
    w.ctl.delete_operation(&op.id).unwrap();
    assert_eq!(kind(w.ctl.operation(&op.id)), NotFound);
    assert_eq!(kind(w.ctl.delete_operation(&op.id)), NotFound);
    // Its request_id went with it: the same call starts a new operation.
    let again = w.ctl.import(w.import_params("a", "req-1")).await.unwrap();
    assert_ne!(again.id, op.id);
    w.ctl.cancel(&again.id).unwrap();
}

/// More than the old in-memory bound of finished operations are all kept, newest first.
#[tokio::test]
async fn finished_operations_are_not_dropped_after_a_count() {
    let w = World::new(vec![]);
    let mut ids = Vec::new();
    for i in 0..210 {
        let op = w
            .ctl
            .import(w.import_params(&format!("i{i}"), ""))
            .await
            .unwrap();
        w.ctl.cancel(&op.id).unwrap();
        ids.push(op.id);
    }
    for id in &ids {
        w.ctl
            .wait_operation(id, Duration::from_secs(10))
            .await
            .unwrap();
    }
    let all = w.ctl.operations().unwrap();
    assert_eq!(all.len(), 210);
    assert!(all.iter().all(|o| o.state == OpState::Cancelled));
    assert!(
        all.windows(2).all(|p| p[0].created_at >= p[1].created_at),
        "newest first"
    );
    assert!(
        w.ctl.table().live.is_empty(),
        "ended operations leave memory"
    );
    let page = w.ctl.operations_page(None, 10).unwrap();
    assert_eq!(page, all[..10]);
    let last = &page[9];
    let next = w
        .ctl
        .operations_page(Some((last.created_at, &last.id)), 10)
        .unwrap();
    assert_eq!(next, all[10..20]);
}

// ------------------------------------------------------------------------------- the seam

/// The consistency point through the trait: freeze, begin the pull backup, thaw at once; the
/// job is ended through the trait when the read is over.
#[tokio::test]
async fn a_quiesced_backup_freezes_begins_thaws_and_ends_only_its_job() {
    use crate::capture::live;
    let w = World::new(vec![FakeDomain::new("vm", DomainState::Running)]);
    let run = w.dir.path().join("run");
    // QEMU would create the socket as the job begins; the fake does not serve one.
    std::fs::create_dir_all(run.join("backup-op1")).unwrap();
    std::fs::write(run.join("backup-op1/nbd.sock"), b"").unwrap();
    let hv: Arc<dyn Hypervisor> = Arc::new(w.hv.clone());
    let disks = vec!["vda".to_string()];
    let (export, point, _) = live::begin(
        hv.clone(),
        "vm",
        "vda",
        &disks,
        &run,
        "op1",
        true,
        Duration::from_secs(5),
        Default::default(),
    )
    .await
    .unwrap();
    assert_eq!(point.frozen_filesystems, 1);
    assert!(!w.hv.is_frozen("vm"));
    assert_eq!(w.hv.backup_job("vm"), Some(run.join("backup-op1/nbd.sock")));
    export.end().await.unwrap();
    assert_eq!(w.hv.backup_job("vm"), None);
    assert!(
        !run.join("backup-op1").exists(),
        "the job's directory is removed"
    );
    assert_eq!(
        w.hv.calls(),
        [
            Call::Freeze("vm".into()),
            Call::BackupBegin("vm".into(), "vda".into()),
            Call::Thaw("vm".into()),
            Call::BackupEnd("vm".into()),
        ]
    );

    // A backup that cannot begin still thaws the guest.
    w.hv.fail(crate::hypervisor::fake::Step::BackupBegin);
    let e = live::begin(
        hv,
        "vm",
        "vda",
        &disks,
        &run,
        "op2",
        true,
        Duration::from_secs(5),
        Default::default(),
    )
    .await
    .err()
    .expect("the backup fails");
    assert_eq!(e.kind(), ErrorKind::Internal);
    assert!(!w.hv.is_frozen("vm"));
    assert_eq!(w.hv.calls().last(), Some(&Call::Thaw("vm".into())));
}

/// Recovery through the trait: a frozen guest is thawed through its agent, our backup job is
/// ended, another tool's job is left alone, a domain to restart is started.
#[tokio::test]
async fn recovery_thaws_ends_our_job_leaves_a_foreign_one_and_restarts() {
    use super::journal::{Entry, Journal};
    let w = World::new(vec![
        FakeDomain::new("a", DomainState::Running),
        FakeDomain::new("b", DomainState::ShutOff),
    ]);
    let run = w.dir.path().join("run");
    let hv: Arc<dyn Hypervisor> = Arc::new(w.hv.clone());
    w.hv.fs_freeze("a").unwrap();
    let ours = crate::hypervisor::BackupHandle::in_dir(&run.join("backup-op-a"), "vda");
    w.hv.foreign_backup("b", Path::new("/var/lib/other-tool/nbd.sock"));
    w.hv.begin_pull_backup("a", &ours, &[], &Default::default())
        .unwrap();
    let journal = Journal::new(&run);
    let mut a = Entry::new("op-a", "a");
    a.frozen = true;
    a.backup_dir = ours.dir.clone();
    journal.write(&a).unwrap();
    let mut b = Entry::new("op-b", "b");
    b.backup_dir = run.join("backup-op-b");
    b.restart = true;
    journal.write(&b).unwrap();
    let before = w.hv.calls().len();

    journal.recover(hv).await;

    assert!(!w.hv.is_frozen("a"));
    assert_eq!(w.hv.backup_job("a"), None, "our job ended");
    assert_eq!(
        w.hv.backup_job("b").as_deref(),
        Some(Path::new("/var/lib/other-tool/nbd.sock")),
        "another tool's job is left alone"
    );
    assert_eq!(w.hv.domain_state("b").unwrap(), DomainState::Running);
    let calls = w.hv.calls()[before..].to_vec();
    assert!(calls.contains(&Call::Thaw("a".into())), "{calls:?}");
    assert!(calls.contains(&Call::BackupEnd("a".into())), "{calls:?}");
    assert!(!calls.contains(&Call::BackupEnd("b".into())), "{calls:?}");
    assert!(calls.contains(&Call::Start("b".into())), "{calls:?}");
    assert!(journal.entries().is_empty(), "every duty done");
}

/// A capture killed after its job defined checkpoint records: recovery ends the job, then
/// deletes both records, the new checkpoint with its bitmap (no image builds on it), the one
/// the job counted from without (it is still the base of the next capture).
#[tokio::test]
async fn recovery_deletes_the_checkpoint_records_a_killed_capture_left() {
    use super::journal::{Entry, Journal};
    use crate::hypervisor::{CheckpointPlan, SavedCheckpoint};
    let w = World::new(vec![w_domain_running("vm")]);
    let run = w.dir.path().join("run");
    let hv: Arc<dyn Hypervisor> = Arc::new(w.hv.clone());
    // An earlier capture's checkpoint, saved (its record deleted, its bitmap kept).
    let first = crate::hypervisor::BackupHandle::in_dir(&run.join("backup-op-1"), "vda");
    let plan1 = CheckpointPlan {
        create: Some("imaged-vda-op-1".into()),
        since: None,
    };
    w.hv.begin_pull_backup("vm", &first, &[], &plan1).unwrap();
    w.hv.end_backup("vm", &first).unwrap();
    w.hv.delete_checkpoint("vm", "imaged-vda-op-1", true)
        .unwrap();
    // The capture that was killed: its job redefined the old record and made a new one.
    let job = crate::hypervisor::BackupHandle::in_dir(&run.join("backup-op-2"), "vda");
    let plan2 = CheckpointPlan {
        create: Some("imaged-vda-op-2".into()),
        since: Some(SavedCheckpoint {
            name: "imaged-vda-op-1".into(),
            xml: "<domaincheckpoint/>".into(),
        }),
    };
    let begun = w.hv.begin_pull_backup("vm", &job, &[], &plan2).unwrap();
    assert_eq!(begun.since.as_deref(), Some("imaged-vda-op-1"));
    let journal = Journal::new(&run);
    let mut e = Entry::new("op-2", "vm");
    e.backup_dir = job.dir.clone();
    e.checkpoint_duty("imaged-vda-op-1", true);
    e.checkpoint_duty("imaged-vda-op-2", false);
    journal.write(&e).unwrap();
    assert_eq!(w.hv.checkpoints("vm").unwrap().len(), 2);
    w.hv.fail_times(Step::CheckpointDelete, 1, ErrorKind::Unavailable);

    journal.recover(hv.clone()).await;
    assert_eq!(w.hv.backup_job("vm"), None, "the job ended first");
    assert_eq!(
        journal.entries().len(),
        1,
        "a record libvirt could not delete yet stays a duty"
    );
    journal.recover(hv).await;

    assert!(journal.entries().is_empty(), "every duty done");
    assert!(w.hv.checkpoints("vm").unwrap().is_empty(), "no record left");
    assert_eq!(
        w.hv.bitmaps("vm"),
        vec!["imaged-vda-op-1".to_string()],
        "the base's bitmap stays, the dead capture's goes"
    );
}

/// Waits (bounded) until `f` holds.
async fn until(what: &str, f: impl Fn() -> bool) {
    let t0 = std::time::Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(10), "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A capture ended while libvirt did not answer: its journal entry keeps the job; once the
/// operation has ended, a janitor retries ending it (UNAVAILABLE twice, then it works),
/// holding the domain meanwhile, and removes the entry and the job's directory when done.
#[tokio::test]
async fn a_janitor_ends_the_job_an_ended_capture_left_and_frees_the_domain() {
    use super::journal::{Entry, Journal};
    let w = World::new(vec![w_domain_running("vm")]);
    let run = w.dir.path().join("run");
    let op = OpEntry::new(OpKind::Capture, "vm", "img", "", "/disk");
    let job =
        crate::hypervisor::BackupHandle::in_dir(&run.join(format!("backup-{}", op.id)), "vda");
    std::fs::create_dir_all(&job.dir).unwrap();
    w.hv.begin_pull_backup("vm", &job, &[], &Default::default())
        .unwrap();
    let journal = Journal::new(&run);
    let mut e = Entry::new(&op.id, "vm");
    e.backup_dir = job.dir.clone();
    journal.write(&e).unwrap();
    {
        let mut t = w.ctl.table();
        t.domain_locks.insert("vm".into(), op.id.clone());
        w.ctl.insert(&mut t, &op, "repository", "").unwrap();
    }
    w.hv.fail_times(Step::BackupEnd, 2, ErrorKind::Unavailable);

    w.ctl.end(&op, Ok(()));

    assert_eq!(
        op.state(),
        OpState::Active,
        "the image is good: the op succeeded"
    );
    let refused = w.ctl.capture(capture("vm", Mode::CrashConsistent)).await;
    let err = refused.expect_err("the domain is held while the cleanup runs");
    assert_eq!(err.kind(), ErrorKind::Aborted);
    assert!(err.chain().contains("cleaned up after operation"), "{err}");
    until("the janitor is done", || journal.entries().is_empty()).await;
    assert_eq!(w.hv.backup_job("vm"), None, "our job ended");
    assert!(!job.dir.exists(), "its directory removed");
    until("the domain is free", || {
        !w.ctl.table().domain_locks.contains_key("vm")
    })
    .await;
}

/// Entries a previous run left (recovery could not finish them) are adopted at start: the
/// janitor finishes them and releases the domain; a restart owed is done too.
#[tokio::test]
async fn entries_left_by_a_previous_run_are_adopted_by_janitors() {
    use super::journal::{Entry, Journal};
    let w = World::new(vec![FakeDomain::new("off", DomainState::ShutOff)]);
    let journal = Journal::new(&w.dir.path().join("run"));
    let mut e = Entry::new("op-old", "off");
    e.restart = true;
    journal.write(&e).unwrap();
    w.hv.fail_times(Step::Start, 3, ErrorKind::Unavailable);
    w.ctl.adopt_journal();
    assert!(w.ctl.table().domain_locks.contains_key("off"));
    until("the janitor is done", || journal.entries().is_empty()).await;
    assert_eq!(w.hv.domain_state("off").unwrap(), DomainState::Running);
    until("the domain is free", || {
        w.ctl.table().domain_locks.is_empty()
    })
    .await;
}

/// A backup job that imaged left on a domain (its export under our run dir, no journal entry
/// any more) is ended before a new capture begins; another tool's job is refused and left.
#[tokio::test]
async fn our_own_leftover_job_is_ended_first_and_a_foreign_one_refused() {
    let w = World::new(vec![w_domain_running("vm"), w_domain_running("other")]);
    let run = w.dir.path().join("run");
    let old = crate::hypervisor::BackupHandle::in_dir(&run.join("backup-op-old"), "vda");
    std::fs::create_dir_all(&old.dir).unwrap();
    w.hv.begin_pull_backup("vm", &old, &[], &Default::default())
        .unwrap();
    let op = OpEntry::new(OpKind::Capture, "vm", "img", "", "/disk");
    w.ctl.end_own_leftover_job(&op, "vm").await.unwrap();
    assert_eq!(w.hv.backup_job("vm"), None, "our leftover job ended");
    assert!(!old.dir.exists(), "and its directory removed");
    // Nothing runs: nothing to do.
    w.ctl.end_own_leftover_job(&op, "vm").await.unwrap();

    let theirs = Path::new("/var/lib/other-tool/nbd.sock");
    w.hv.foreign_backup("other", theirs);
    let op = OpEntry::new(OpKind::Capture, "other", "img2", "", "/disk");
    let err = w.ctl.end_own_leftover_job(&op, "other").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert!(err.chain().contains("domain other"), "{err}");
    assert_eq!(
        w.hv.backup_job("other").as_deref(),
        Some(theirs),
        "left alone"
    );
}

/// At start, after recovery: sockets and job directories of ended operations go; a
/// directory a journal entry still names, the lock file, other names and symbolic links stay.
#[test]
fn leftovers_in_the_run_dir_are_swept_but_journaled_ones_kept() {
    use super::journal::{Entry, Journal};
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    std::fs::create_dir_all(run.join("backup-op-gone")).unwrap();
    std::fs::write(run.join("backup-op-gone/scratch"), b"x").unwrap();
    std::fs::create_dir_all(run.join("backup-op-kept")).unwrap();
    std::fs::write(run.join("op-1.sock"), b"").unwrap();
    std::fs::write(run.join("imaged.lock"), b"").unwrap();
    std::fs::write(run.join("notes.txt"), b"").unwrap();
    let outside = d.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("precious"), b"x").unwrap();
    std::os::unix::fs::symlink(&outside, run.join("backup-op-link")).unwrap();
    let journal = Journal::new(&run);
    let mut e = Entry::new("op-kept", "vm");
    e.backup_dir = run.join("backup-op-kept");
    journal.write(&e).unwrap();
    std::fs::write(run.join("journal/.op-x.json.tmp-1"), b"{").unwrap();

    journal.sweep_run_dir(&[]);

    assert!(!run.join("backup-op-gone").exists());
    assert!(!run.join("op-1.sock").exists());
    assert!(run.join("backup-op-kept").is_dir(), "journaled: kept");
    assert!(run.join("imaged.lock").exists());
    assert!(run.join("notes.txt").exists());
    assert!(outside.join("precious").exists(), "links are not followed");
    assert!(std::fs::symlink_metadata(run.join("backup-op-link")).is_ok());
    assert!(!run.join("journal/.op-x.json.tmp-1").exists());
    assert_eq!(journal.entries(), vec![e]);
}

/// Prep left in a guest that is shut off cannot be undone now: the entry stays for a later
/// start and the domain is not held for it.
#[tokio::test]
async fn prep_in_a_shut_off_guest_is_deferred_without_holding_the_domain() {
    use super::journal::{Cleanup, Entry, Journal};
    let w = World::new(vec![FakeDomain::new("off", DomainState::ShutOff)]);
    let journal = Journal::new(&w.dir.path().join("run"));
    let mut e = Entry::new("op-p", "off");
    e.prep = Some(Vec::new());
    journal.write(&e).unwrap();
    let hv: Arc<dyn Hypervisor> = Arc::new(w.hv.clone());
    assert!(matches!(
        journal.settle(hv, e.clone()).await,
        Cleanup::Deferred(_)
    ));
    assert_eq!(journal.entries(), vec![e]);
    w.ctl.adopt_journal();
    until("the domain is free", || {
        w.ctl.table().domain_locks.is_empty()
    })
    .await;
}

fn w_domain_running(name: &str) -> FakeDomain {
    FakeDomain::new(name, DomainState::Running)
}

/// A job directory of ours that no journal entry names any more, whose job still runs: the
/// start ends that job (and only that one) before the sweep removes the directory.
#[tokio::test]
async fn a_job_of_ours_without_a_journal_entry_is_ended_at_start() {
    use super::journal::Journal;
    let w = World::new(vec![
        w_domain_running("a"),
        w_domain_running("b"),
        FakeDomain::new("off", DomainState::ShutOff),
    ]);
    let run = w.dir.path().join("run");
    let ours = crate::hypervisor::BackupHandle::in_dir(&run.join("backup-op-lost"), "vda");
    std::fs::create_dir_all(&ours.dir).unwrap();
    w.hv.begin_pull_backup("a", &ours, &[], &Default::default())
        .unwrap();
    let theirs = Path::new("/var/lib/other-tool/nbd.sock");
    w.hv.foreign_backup("b", theirs);
    let journal = Journal::new(&run);
    let hv: Arc<dyn Hypervisor> = Arc::new(w.hv.clone());
    let unsure = journal.end_orphan_jobs(hv).await;
    assert!(unsure.is_empty(), "{unsure:?}");
    journal.sweep_run_dir(&unsure);
    assert_eq!(w.hv.backup_job("a"), None, "ours ended");
    assert_eq!(w.hv.backup_job("b").as_deref(), Some(theirs), "theirs left");
    assert!(!ours.dir.exists());
}

#[tokio::test]
async fn host_paths_outside_the_allowed_directories_are_refused() {
    let w = World::new(vec![]);
    w.image("img");
    let e = w
        .ctl
        .import(ImportParams {
            path: "/etc/shadow".into(),
            format: "raw".into(),
            image_name: "stolen".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    assert!(e.to_string().contains("/etc/shadow"), "{e}");
    let e = w
        .ctl
        .export(ExportParams {
            image_name: "img".into(),
            format: Format::Raw,
            path: "/etc/passwd".into(),
            overwrite: true,
            request_id: String::new(),
            requester: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
}

#[tokio::test]
async fn operations_per_identity_are_limited() {
    let dir = tempfile::tempdir().unwrap();
    let real = std::fs::canonicalize(dir.path()).unwrap();
    let mut cfg = Config::default();
    cfg.daemon.max_running_operations = 0;
    cfg.daemon.max_operations_per_identity = 2;
    cfg.capture.run_dir = dir.path().join("run");
    cfg.paths.import_dirs = vec![real];
    cfg.daemon.state_dir = dir.path().join("state");
    let repo = Repository::open(&dir.path().join("repo")).unwrap();
    let ctl = Controller::open(cfg, Arc::new(FakeHypervisor::new(vec![])), repo).unwrap();
    let file = dir.path().join("disk.raw");
    std::fs::write(&file, vec![0u8; 1 << 20]).unwrap();
    let import = |name: &str, who: &str| ImportParams {
        path: file.clone(),
        format: "raw".into(),
        image_name: name.into(),
        request_id: String::new(),
        description: String::new(),
        requester: who.into(),
    };
    let a = ctl.import(import("a", "uid:7")).await.unwrap();
    assert_eq!(a.requester, "uid:7");
    ctl.import(import("b", "uid:7")).await.unwrap();
    let e = ctl.import(import("c", "uid:7")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ResourceExhausted);
    assert!(e.to_string().contains("uid:7"), "{e}");
    assert!(
        e.to_string().contains("max_operations_per_identity = 2"),
        "{e}"
    );
    // Someone else is not held back, nor are internal callers.
    ctl.import(import("d", "tls:CN=cp1")).await.unwrap();
    ctl.import(import("e", "")).await.unwrap();
    // An ended operation no longer counts.
    ctl.cancel(&a.id).unwrap();
    let t0 = std::time::Instant::now();
    while !ctl.operation(&a.id).unwrap().state.is_terminal() {
        assert!(t0.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ctl.import(import("c", "uid:7")).await.unwrap();
}
