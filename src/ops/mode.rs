//! Capture modes and the one decision a capture request needs before anything is touched:
//! which mode runs, and whether every option asked for (prep steps, restore-source, restart,
//! force-off) makes sense for that mode and the domain's state.
//!
//! [`decide`] is a pure function of the request and what is known of the domain, so every
//! combination the API accepts is pinned down by a table test (this file's tests): each one is
//! either refused with a precise error or does what it says. The caller probes the guest agent
//! only when [`needs_agent`] says the answer matters.
//!
//! | mode | domain state | agent | prep | restore-source | restart / force-off |
//! |---|---|---|---|---|---|
//! | cold | shut off | — | refused (INVALID_ARGUMENT) | refused | refused |
//! | shutdown | running | any (prep: Linux or Windows agent) | before the shutdown | needs prep and restart: undone after the start | yes |
//! | shutdown | shut off | — | refused (nothing runs) | refused | restart: nothing to start again; accepted |
//! | quiesce | running | Linux agent | before the freeze | undone after the consistency point | refused |
//! | crash-consistent | running | — | refused (no freeze: the changes may not be on disk) | refused | refused |
//! | auto | shut off → cold; running + Linux agent → quiesce; running + Windows agent → shutdown; else refused | | as the chosen mode | | |

use crate::error::{invalid, precondition, Error, Result};
use crate::hypervisor::DomainState;

/// How to reach a consistent disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Pick what a user expects: see [`decide`].
    #[default]
    Auto,
    Cold,
    Shutdown,
    Quiesce,
    CrashConsistent,
}

impl Mode {
    /// Every mode, `Auto` first.
    pub const ALL: [Mode; 5] = [
        Mode::Auto,
        Mode::Cold,
        Mode::Shutdown,
        Mode::Quiesce,
        Mode::CrashConsistent,
    ];

    /// The mode's name, as the CLI and the API spell it.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Auto => "auto",
            Mode::Cold => "cold",
            Mode::Shutdown => "shutdown",
            Mode::Quiesce => "quiesce",
            Mode::CrashConsistent => "crash-consistent",
        }
    }
}

/// The consistency level a mode gives, as recorded on the image.
pub fn consistency_of(mode: Mode) -> &'static str {
    match mode {
        Mode::Cold | Mode::Auto | Mode::Shutdown => "cold",
        Mode::Quiesce => "quiesced",
        Mode::CrashConsistent => "crash-consistent",
    }
}

/// Parses a mode name from the CLI or the API.
pub fn parse_mode(s: &str) -> Result<Mode> {
    Ok(match s {
        "auto" => Mode::Auto,
        "cold" => Mode::Cold,
        "shutdown" => Mode::Shutdown,
        "quiesce" => Mode::Quiesce,
        "crash-consistent" => Mode::CrashConsistent,
        other => {
            return Err(invalid(format!(
                "capture mode {other:?} is unknown: use auto, cold, shutdown, quiesce or crash-consistent"
            )))
        }
    })
}

/// What a capture asks for, besides the domain and the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Asked {
    pub mode: Mode,
    /// Prep steps were named.
    pub prep: bool,
    pub restore_source: bool,
    pub restart: bool,
    pub force_off: bool,
}

/// What the guest agent said, when it was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentState {
    /// The domain has no guest agent channel.
    NoChannel,
    /// It has one, but the agent did not answer.
    Silent,
    /// A Linux (or other non-Windows) guest answered.
    Linux,
    /// A Windows guest answered.
    Windows,
    /// Not asked: [`needs_agent`] said it does not matter.
    NotAsked,
}

/// What is known of the domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts<'a> {
    pub domain: &'a str,
    pub state: DomainState,
    pub has_agent_channel: bool,
    pub agent: AgentState,
}

/// What runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Never [`Mode::Auto`].
    pub mode: Mode,
    /// The domain was running: a shutdown capture shuts it down (and may start it again).
    pub was_running: bool,
    pub prep: bool,
    pub restore_source: bool,
    /// Start the domain again after a shutdown capture, whatever the outcome.
    pub restart: bool,
    pub force_off: bool,
}

fn is_running(state: DomainState) -> bool {
    matches!(
        state,
        DomainState::Running | DomainState::Paused | DomainState::Blocked
    )
}

/// Whether [`decide`] needs to know what the guest agent says (a ping and the OS id): only for
/// a running domain with an agent channel, when the mode is quiesce or auto, or prep steps are
/// asked for. Otherwise pass [`AgentState::NotAsked`] (or [`AgentState::NoChannel`]).
pub fn needs_agent(asked: &Asked, state: DomainState, has_agent_channel: bool) -> bool {
    has_agent_channel
        && is_running(state)
        && (matches!(asked.mode, Mode::Quiesce | Mode::Auto) || asked.prep)
}

/// Decides the mode and checks every option against it and the domain's state. Errors:
/// INVALID_ARGUMENT for options that never fit the mode, FAILED_PRECONDITION for what the
/// domain's current state does not allow; each names what would work.
pub fn decide(asked: &Asked, f: &Facts<'_>) -> Result<Decision> {
    let name = f.domain;
    let state = f.state;
    let running = is_running(state);
    let subject = format!("domains/{name}");
    // The reason names the state that stopped the call: DOMAIN_RUNNING, DOMAIN_SHUT_OFF, ...
    let state_reason = format!(
        "DOMAIN_{}",
        state.as_str().to_ascii_uppercase().replace([' ', '-'], "_")
    );
    let is_now = |what: String| {
        precondition(format!("domain {name} is {}; {what}", state.as_str()))
            .with_reason(&state_reason)
            .with_subject(subject.clone())
    };
    let agent_missing = || -> Error {
        match f.agent {
            AgentState::NoChannel => precondition(format!(
                "domain {name} has no guest agent channel (org.qemu.guest_agent.0); add one and \
                 install qemu-guest-agent in the guest"
            ))
            .with_reason("AGENT_CHANNEL_MISSING")
            .with_subject(subject.clone()),
            _ => precondition(format!(
                "the guest agent of domain {name} does not answer; start qemu-guest-agent in the guest"
            ))
            .with_reason("AGENT_UNREACHABLE")
            .with_subject(subject.clone()),
        }
    };
    // What never fits the mode asked for is refused first, whatever the domain's state.
    if asked.restore_source && !asked.prep {
        return Err(invalid(
            "restore_source undoes the prep steps in the source after the capture: it needs prep steps",
        ));
    }
    if matches!(
        asked.mode,
        Mode::Cold | Mode::Quiesce | Mode::CrashConsistent
    ) && (asked.restart || asked.force_off)
    {
        let opt = if asked.restart {
            "restart"
        } else {
            "force_off"
        };
        return Err(invalid(format!(
            "{opt} applies to mode shutdown only; mode {} does not shut the guest down",
            asked.mode.name()
        )));
    }
    if asked.prep && asked.mode == Mode::Cold {
        return Err(invalid(format!(
            "prep steps run inside the running guest: mode cold reads a shut-off disk; \
             for domain {name} start it and use mode shutdown (prep, shut down, capture) or quiesce"
        )));
    }
    if asked.prep && asked.mode == Mode::CrashConsistent {
        return Err(invalid(
            "prep steps need a consistency point after them that flushes the guest's writes: \
             use mode quiesce or shutdown, not crash-consistent",
        ));
    }
    let mode = match asked.mode {
        Mode::Cold => {
            if state != DomainState::ShutOff {
                return Err(is_now(format!(
                    "a cold capture needs it shut off (shut it down first, e.g. `virsh shutdown {name}`, or use mode shutdown or quiesce)"
                )));
            }
            Mode::Cold
        }
        Mode::Shutdown => {
            if !running && state != DomainState::ShutOff {
                return Err(is_now(
                    "a shutdown capture needs it running or shut off".into(),
                ));
            }
            Mode::Shutdown
        }
        Mode::CrashConsistent => {
            if !running {
                return Err(is_now("a crash-consistent capture is live and needs it running (use mode cold for a shut-off domain)".into()));
            }
            Mode::CrashConsistent
        }
        Mode::Quiesce => {
            if !running {
                return Err(is_now("a quiesced capture is live and needs it running (use mode cold for a shut-off domain)".into()));
            }
            match f.agent {
                AgentState::Linux => {}
                AgentState::Windows => {
                    return Err(precondition(format!(
                        "domain {name} runs Windows: capture it in shutdown mode"
                    ))
                    .with_reason("WINDOWS_GUEST")
                    .with_subject(subject.clone()))
                }
                _ => return Err(agent_missing()),
            }
            Mode::Quiesce
        }
        Mode::Auto => {
            if state == DomainState::ShutOff {
                Mode::Cold
            } else if !running {
                return Err(is_now("shut it off or start it, then capture".into()));
            } else {
                match f.agent {
                    AgentState::Linux => Mode::Quiesce,
                    AgentState::Windows => Mode::Shutdown,
                    _ => {
                        return Err(precondition(format!(
                            "domain {name} is running and its guest agent does not answer, so it cannot be quiesced; \
                             choose mode crash-consistent (live, no freeze) or shutdown (ACPI power button)"
                        ))
                        .with_reason("AGENT_UNREACHABLE")
                        .with_subject(subject.clone()))
                    }
                }
            }
        }
    };
    let chosen = if asked.mode == Mode::Auto {
        format!("mode auto chose {} for domain {name}", mode.name())
    } else {
        format!("mode {}", mode.name())
    };
    // Options that belong to a shutdown only.
    if (asked.restart || asked.force_off) && mode != Mode::Shutdown {
        let opt = if asked.restart {
            "restart"
        } else {
            "force_off"
        };
        return Err(invalid(format!(
            "{opt} applies to mode shutdown only; {chosen} does not shut the guest down"
        )));
    }
    if asked.prep {
        match mode {
            Mode::Quiesce | Mode::Shutdown if running => {
                if state != DomainState::Running {
                    return Err(is_now(
                        "prep steps run inside the running guest: resume it first".into(),
                    ));
                }
                if !matches!(f.agent, AgentState::Linux | AgentState::Windows) {
                    return Err(agent_missing());
                }
            }
            Mode::Cold | Mode::Shutdown => {
                return Err(is_now(
                    "prep steps run inside the running guest before the capture: start it and use mode shutdown (prep, shut down, capture) or quiesce, or capture without prep".into(),
                ));
            }
            _ => {
                return Err(invalid(format!(
                    "prep steps need a consistency point after them that flushes the guest's writes: \
                     use mode quiesce or shutdown ({chosen})"
                )));
            }
        }
    }
    if asked.restore_source {
        if f.agent == AgentState::Windows {
            return Err(precondition(format!(
                "domain {name} runs Windows: its network settings changed by netsh cannot be restored automatically, so restore_source is refused"
            ))
            .with_reason("WINDOWS_GUEST")
            .with_subject(subject.clone()));
        }
        if mode == Mode::Shutdown && !asked.restart {
            return Err(invalid(
                "restore_source in mode shutdown needs restart: the prep is undone through the guest agent once the guest runs again",
            ));
        }
    }
    Ok(Decision {
        mode,
        was_running: running,
        prep: asked.prep,
        restore_source: asked.restore_source,
        restart: asked.restart && running,
        force_off: asked.force_off,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    const STATES: [DomainState; 4] = [
        DomainState::Running,
        DomainState::Paused,
        DomainState::ShutOff,
        DomainState::Crashed,
    ];
    const AGENTS: [AgentState; 4] = [
        AgentState::NoChannel,
        AgentState::Silent,
        AgentState::Linux,
        AgentState::Windows,
    ];

    /// Every request the API can make: mode × 4 boolean options.
    fn all_asked() -> Vec<Asked> {
        let mut v = Vec::new();
        for mode in Mode::ALL {
            for bits in 0..16u8 {
                v.push(Asked {
                    mode,
                    prep: bits & 1 != 0,
                    restore_source: bits & 2 != 0,
                    restart: bits & 4 != 0,
                    force_off: bits & 8 != 0,
                });
            }
        }
        v
    }

    fn facts(state: DomainState, agent: AgentState) -> Facts<'static> {
        Facts {
            domain: "web",
            state,
            has_agent_channel: agent != AgentState::NoChannel,
            agent,
        }
    }

    /// The whole table: every accepted combination does what it says, and every refusal is
    /// INVALID_ARGUMENT or FAILED_PRECONDITION with the domain or the option named.
    #[test]
    fn every_combination_is_done_as_asked_or_refused() {
        let mut accepted = 0;
        let mut refused = 0;
        for asked in all_asked() {
            for state in STATES {
                for agent in AGENTS {
                    let f = facts(state, agent);
                    let ctx = format!("{asked:?} {state:?} {agent:?}");
                    match decide(&asked, &f) {
                        Ok(d) => {
                            accepted += 1;
                            assert_ne!(d.mode, Mode::Auto, "{ctx}");
                            if asked.mode != Mode::Auto {
                                assert_eq!(d.mode, asked.mode, "{ctx}: the mode asked for runs");
                            }
                            // Nothing asked for is dropped.
                            assert_eq!(d.prep, asked.prep, "{ctx}");
                            assert_eq!(d.restore_source, asked.restore_source, "{ctx}");
                            assert_eq!(d.force_off, asked.force_off, "{ctx}");
                            let running = state != DomainState::ShutOff;
                            assert_eq!(d.was_running, running, "{ctx}");
                            // Live modes need a running domain; cold a shut-off one.
                            match d.mode {
                                Mode::Cold => assert_eq!(state, DomainState::ShutOff, "{ctx}"),
                                Mode::Quiesce => {
                                    assert!(running, "{ctx}");
                                    assert_eq!(agent, AgentState::Linux, "{ctx}");
                                }
                                Mode::CrashConsistent => assert!(running, "{ctx}"),
                                Mode::Shutdown | Mode::Auto => {}
                            }
                            // Prep runs only in a running guest whose agent answers, and only
                            // where a consistency point follows that flushes it.
                            if d.prep {
                                assert_eq!(state, DomainState::Running, "{ctx}");
                                assert!(
                                    matches!(agent, AgentState::Linux | AgentState::Windows),
                                    "{ctx}"
                                );
                                assert!(matches!(d.mode, Mode::Quiesce | Mode::Shutdown), "{ctx}");
                            }
                            if d.restore_source {
                                assert!(d.prep, "{ctx}");
                                assert_ne!(
                                    agent,
                                    AgentState::Windows,
                                    "{ctx}: netsh cannot be undone"
                                );
                                if d.mode == Mode::Shutdown {
                                    assert!(d.restart, "{ctx}: restore needs the guest running");
                                }
                            }
                            if asked.restart || asked.force_off {
                                assert_eq!(d.mode, Mode::Shutdown, "{ctx}");
                            }
                            assert_eq!(d.restart, asked.restart && running, "{ctx}");
                        }
                        Err(e) => {
                            refused += 1;
                            // Options that never fit the mode are INVALID_ARGUMENT whatever
                            // the domain's state.
                            let never_fits = (asked.mode == Mode::Cold && asked.prep)
                                || (matches!(
                                    asked.mode,
                                    Mode::Cold | Mode::Quiesce | Mode::CrashConsistent
                                ) && (asked.restart || asked.force_off))
                                || (asked.mode == Mode::CrashConsistent && asked.prep)
                                || (asked.restore_source && !asked.prep);
                            if never_fits {
                                assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{ctx}: {e}");
                            }
                            assert!(
                                matches!(
                                    e.kind(),
                                    ErrorKind::InvalidArgument | ErrorKind::FailedPrecondition
                                ),
                                "{ctx}: {e}"
                            );
                            let msg = e.to_string();
                            assert!(
                                msg.contains("web")
                                    || msg.contains("restart")
                                    || msg.contains("force_off")
                                    || msg.contains("restore_source")
                                    || msg.contains("prep"),
                                "{ctx}: the error names neither the domain nor the option: {msg}"
                            );
                        }
                    }
                }
            }
        }
        assert!(
            accepted > 50 && refused > 50,
            "{accepted} accepted, {refused} refused"
        );
    }

    fn ask(mode: Mode) -> Asked {
        Asked {
            mode,
            ..Asked::default()
        }
    }

    #[test]
    fn shutdown_with_prep_on_a_running_guest_keeps_the_prep() {
        let a = Asked {
            prep: true,
            restart: true,
            restore_source: true,
            ..ask(Mode::Shutdown)
        };
        let d = decide(&a, &facts(DomainState::Running, AgentState::Linux)).unwrap();
        assert_eq!(d.mode, Mode::Shutdown);
        assert!(d.prep && d.restart && d.restore_source && d.was_running);
    }

    #[test]
    fn prep_on_a_shut_off_guest_is_a_failed_precondition_naming_what_works() {
        let a = Asked {
            prep: true,
            ..ask(Mode::Shutdown)
        };
        let e = decide(&a, &facts(DomainState::ShutOff, AgentState::NoChannel)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
        assert!(
            e.to_string().contains("start it and use mode shutdown"),
            "{e}"
        );
        let e = decide(
            &Asked {
                prep: true,
                ..ask(Mode::Auto)
            },
            &facts(DomainState::ShutOff, AgentState::NoChannel),
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
    }

    #[test]
    fn restart_and_force_off_outside_shutdown_are_refused() {
        for mode in [Mode::Quiesce, Mode::CrashConsistent] {
            let a = Asked {
                restart: true,
                ..ask(mode)
            };
            let e = decide(&a, &facts(DomainState::Running, AgentState::Linux)).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{mode:?}");
        }
        let a = Asked {
            force_off: true,
            ..ask(Mode::Auto)
        };
        let e = decide(&a, &facts(DomainState::Running, AgentState::Linux)).unwrap_err();
        assert!(e.to_string().contains("mode auto chose quiesce"), "{e}");
        // Auto that chooses shutdown (Windows) takes them.
        let d = decide(&a, &facts(DomainState::Running, AgentState::Windows)).unwrap();
        assert_eq!(d.mode, Mode::Shutdown);
    }

    #[test]
    fn restore_source_in_shutdown_needs_restart() {
        let a = Asked {
            prep: true,
            restore_source: true,
            ..ask(Mode::Shutdown)
        };
        let e = decide(&a, &facts(DomainState::Running, AgentState::Linux)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(e.to_string().contains("needs restart"), "{e}");
    }

    #[test]
    fn the_agent_is_asked_only_when_it_matters() {
        assert!(needs_agent(&ask(Mode::Auto), DomainState::Running, true));
        assert!(needs_agent(&ask(Mode::Quiesce), DomainState::Running, true));
        assert!(!needs_agent(
            &ask(Mode::CrashConsistent),
            DomainState::Running,
            true
        ));
        assert!(!needs_agent(
            &ask(Mode::Shutdown),
            DomainState::Running,
            true
        ));
        let prep = Asked {
            prep: true,
            ..ask(Mode::Shutdown)
        };
        assert!(needs_agent(&prep, DomainState::Running, true));
        assert!(!needs_agent(&prep, DomainState::ShutOff, true));
        assert!(!needs_agent(
            &ask(Mode::Quiesce),
            DomainState::Running,
            false
        ));
    }
}
