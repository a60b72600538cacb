//! Who may do what: the caller's identity, the policy that gives it roles, and the one gate
//! every request passes ([`AuthLayer`]).
//!
//! - Identities: on the unix socket the peer's uid and gid (SO_PEERCRED, read by tonic into
//!   [`UdsConnectInfo`]); on TCP the client certificate of the mutual TLS handshake
//!   ([`tls::TlsPeer`]: subject CN, DNS and URI SANs). Nothing else reaches the API.
//! - The policy (`[[policy]]` entries of the config, [`Policy`]) maps identities to
//!   [`Role`]s; without entries uid 0 on the unix socket is admin and nobody else has a role.
//! - [`methods`] holds the table from gRPC method to the role it needs; [`AuthLayer`]
//!   applies it to every request and puts the resolved [`Caller`] into the request's
//!   extensions for the handlers.
//! - [`Trust`] keeps the TLS server config and the policy behind a swap, so SIGHUP can
//!   replace them without touching open connections or running operations.

pub mod layer;
pub mod methods;
pub mod tls;
mod x509;

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};

use tonic::transport::server::UdsConnectInfo;

use crate::config::{Config, PolicyEntry, Role};
use crate::error::{invalid, Result};
pub use layer::AuthLayer;

/// Who is on the other end of a connection, as the transport proved it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A unix socket peer: its process's user and primary group.
    Unix { uid: u32, gid: u32 },
    /// A TLS client: the names of its verified certificate.
    Tls(tls::TlsIdentity),
    /// No identity could be read (no peer credentials): gets no role.
    Unknown,
}

impl Peer {
    /// The peer of a request, from the connection info tonic put into its extensions.
    pub fn of(ext: &tonic::codegen::http::Extensions) -> Peer {
        if let Some(info) = ext.get::<UdsConnectInfo>() {
            return match info.peer_cred {
                Some(c) => Peer::Unix {
                    uid: c.uid(),
                    gid: c.gid(),
                },
                None => Peer::Unknown,
            };
        }
        if let Some(p) = ext.get::<tls::TlsPeer>() {
            return Peer::Tls((*p.identity).clone());
        }
        Peer::Unknown
    }

    /// The short name for logs and the operation record: `uid:1000`, `tls:CN=cp1`.
    pub fn name(&self) -> String {
        match self {
            Peer::Unix { uid, .. } => format!("uid:{uid}"),
            Peer::Tls(id) => format!("tls:{}", id.short()),
            Peer::Unknown => "unknown".to_string(),
        }
    }

    /// The longer description for messages: `uid 1000 (gid 1000)`, `TLS client CN=cp1 (SANs
    /// cp1.example.org)`.
    pub fn describe(&self) -> String {
        match self {
            Peer::Unix { uid, gid } => format!("uid {uid} (gid {gid})"),
            Peer::Tls(id) => format!("TLS client {}", id.describe()),
            Peer::Unknown => "a peer without credentials".to_string(),
        }
    }
}

/// The resolved caller of one request, in its extensions for the handlers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// `uid:1000`, `tls:CN=cp1`: the requester recorded on operations and counted by the
    /// per-identity limit.
    pub name: String,
    /// What the policy gives it.
    pub roles: BTreeSet<Role>,
}

impl Caller {
    /// True when one of its roles includes `need`.
    pub fn has(&self, need: Role) -> bool {
        self.roles.iter().any(|r| *r >= need)
    }

    /// The roles for messages: "viewer, operator" or "none".
    pub fn roles_text(&self) -> String {
        if self.roles.is_empty() {
            return "none".to_string();
        }
        let names: Vec<&str> = self.roles.iter().map(|r| r.name()).collect();
        names.join(", ")
    }
}

/// The policy in force: the `[[policy]]` entries, or the default when there are none.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    entries: Vec<(Role, PolicyEntry)>,
}

impl Policy {
    /// The policy of `cfg` (checked as at start: a bad entry is an error naming it).
    pub fn from_config(cfg: &Config) -> Result<Policy> {
        cfg.validate_policy()?;
        let entries = cfg
            .policy
            .iter()
            .map(|e| {
                e.role()
                    .map(|r| (r, e.clone()))
                    .ok_or_else(|| invalid(format!("policy: role {:?} is unknown", e.role)))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Policy { entries })
    }

    /// How many entries (0: the default policy).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True for the default policy (no entries).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The roles `peer` has.
    pub fn roles(&self, peer: &Peer) -> BTreeSet<Role> {
        let mut out = BTreeSet::new();
        if self.entries.is_empty() {
            if matches!(peer, Peer::Unix { uid: 0, .. }) {
                out.insert(Role::Admin);
            }
            return out;
        }
        // The supplementary groups are looked up once, and only when an entry names groups.
        let mut groups: Option<Vec<u32>> = None;
        for (role, e) in &self.entries {
            let hit = match peer {
                Peer::Unix { uid, gid } => {
                    e.unix_uids.contains(uid)
                        || (!e.unix_gids.is_empty()
                            && groups
                                .get_or_insert_with(|| groups_of(*uid, *gid))
                                .iter()
                                .any(|g| e.unix_gids.contains(g)))
                }
                Peer::Tls(id) => {
                    id.cn.as_ref().is_some_and(|cn| e.tls_subjects.contains(cn))
                        || id.sans().any(|s| e.tls_sans.iter().any(|x| x == s))
                }
                Peer::Unknown => false,
            };
            if hit {
                out.insert(*role);
            }
        }
        out
    }

    /// The caller `peer` is under this policy.
    pub fn caller(&self, peer: &Peer) -> Caller {
        Caller {
            name: peer.name(),
            roles: self.roles(peer),
        }
    }
}

/// The groups of a unix peer: its primary `gid`, and the supplementary groups of its user in
/// the host's user database (a uid with no user has only `gid`).
fn groups_of(uid: u32, gid: u32) -> Vec<u32> {
    let mut out = vec![gid];
    let mut buf = vec![0u8; 4096];
    // SAFETY: `pw` is plain data filled by getpwuid_r; `buf` outlives every use of the strings
    // it points into (the name is used only inside this block); `result` is checked before use.
    unsafe {
        let mut pw: libc::passwd = std::mem::zeroed();
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwuid_r(
            uid,
            &mut pw,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        );
        if rc != 0 || result.is_null() {
            return out;
        }
        let mut n: libc::c_int = 64;
        let mut list: Vec<libc::gid_t> = vec![0; n as usize];
        // getgrouplist returns -1 and sets `n` to the number needed when the list is short.
        for _ in 0..2 {
            let got = libc::getgrouplist(pw.pw_name, gid, list.as_mut_ptr(), &mut n);
            if got >= 0 {
                list.truncate(n.max(0) as usize);
                out.extend(list.iter().copied().filter(|g| *g != gid));
                return out;
            }
            list = vec![0; n.max(1) as usize];
        }
    }
    out
}

/// The TLS server config and the policy in force, each behind a swap: [`Trust::reload`]
/// replaces both at once; connections already open keep the config they were made with, and
/// the next request of any connection meets the new policy.
pub struct Trust {
    policy: RwLock<Arc<Policy>>,
    tls: RwLock<Option<Arc<tokio_rustls::rustls::ServerConfig>>>,
}

impl Trust {
    /// The trust of `cfg`: its policy, and its TLS server config when it has `[tls]`.
    pub fn new(cfg: &Config) -> Result<Arc<Trust>> {
        let (policy, tls) = Self::build(cfg)?;
        Ok(Arc::new(Trust {
            policy: RwLock::new(Arc::new(policy)),
            tls: RwLock::new(tls),
        }))
    }

    /// A trust with the default (empty) policy and `tls` as the server config: for servers
    /// that judge callers by a policy of their own (`imagerepo`) and only need [`tls::incoming`].
    pub fn with_tls(tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>) -> Arc<Trust> {
        Arc::new(Trust {
            policy: RwLock::new(Arc::new(Policy::default())),
            tls: RwLock::new(tls),
        })
    }

    #[allow(clippy::type_complexity)]
    fn build(cfg: &Config) -> Result<(Policy, Option<Arc<tokio_rustls::rustls::ServerConfig>>)> {
        let policy = Policy::from_config(cfg)?;
        let tls = match &cfg.tls {
            Some(t) => Some(tls::server_config(t)?),
            None => None,
        };
        Ok((policy, tls))
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The TLS server config in force, if TLS is configured.
    pub fn tls(&self) -> Option<Arc<tokio_rustls::rustls::ServerConfig>> {
        self.tls.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the policy and the TLS config with those of `cfg`, both or neither: a config
    /// that fails to load (a bad entry, an unreadable key) leaves the old ones in force.
    /// Turning TLS on or off needs a restart (the listener is bound at start). Returns a
    /// summary for the log.
    pub fn reload(&self, cfg: &Config) -> Result<String> {
        let had_tls = self.tls().is_some();
        if had_tls != cfg.tls.is_some() {
            return Err(invalid(if had_tls {
                "the new config has no [tls] section, but TCP is being served with TLS: \
                 keep [tls] (a restart applies a change of daemon.tcp_listen)"
            } else {
                "the new config adds [tls], but no TCP listener was started: restart the \
                 daemon to serve TCP"
            }));
        }
        let (policy, tls) = Self::build(cfg)?;
        let summary = format!(
            "{} policy entries{}",
            policy.len(),
            if tls.is_some() {
                ", TLS certificate, key and client CA"
            } else {
                ""
            }
        );
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policy);
        *self.tls.write().unwrap_or_else(|p| p.into_inner()) = tls;
        Ok(summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(toml: &str) -> Policy {
        Policy::from_config(&Config::parse(toml).unwrap()).unwrap()
    }

    fn tls(cn: Option<&str>, dns: &[&str], uris: &[&str]) -> Peer {
        Peer::Tls(tls::TlsIdentity {
            cn: cn.map(str::to_string),
            dns: dns.iter().map(|s| s.to_string()).collect(),
            uris: uris.iter().map(|s| s.to_string()).collect(),
        })
    }

    fn roles(p: &Policy, peer: &Peer) -> Vec<&'static str> {
        p.roles(peer).into_iter().map(Role::name).collect()
    }

    #[test]
    fn default_policy_makes_root_admin_and_nobody_else_anything() {
        let p = policy("");
        assert_eq!(roles(&p, &Peer::Unix { uid: 0, gid: 0 }), ["admin"]);
        assert!(roles(&p, &Peer::Unix { uid: 1000, gid: 0 }).is_empty());
        assert!(roles(&p, &tls(Some("root"), &[], &[])).is_empty());
        assert!(roles(&p, &Peer::Unknown).is_empty());
    }

    #[test]
    fn entries_match_uids_gids_subjects_and_sans() {
        let p = policy(
            r#"
            [[policy]]
            role = "viewer"
            unix_uids = [1000]
            tls_subjects = ["dash"]
            [[policy]]
            role = "operator"
            unix_gids = [2000]
            tls_sans = ["cp1.example.org", "spiffe://example.org/cp1"]
            [[policy]]
            role = "admin"
            unix_uids = [0]
            "#,
        );
        assert_eq!(
            roles(
                &p,
                &Peer::Unix {
                    uid: 1000,
                    gid: 1000
                }
            ),
            ["viewer"]
        );
        assert_eq!(
            roles(
                &p,
                &Peer::Unix {
                    uid: 1000,
                    gid: 2000
                }
            ),
            ["viewer", "operator"]
        );
        assert_eq!(roles(&p, &Peer::Unix { uid: 0, gid: 0 }), ["admin"]);
        assert!(roles(
            &p,
            &Peer::Unix {
                uid: 1001,
                gid: 1001
            }
        )
        .is_empty());
        assert_eq!(roles(&p, &tls(Some("dash"), &[], &[])), ["viewer"]);
        assert_eq!(
            roles(&p, &tls(Some("x"), &["cp1.example.org"], &[])),
            ["operator"]
        );
        assert_eq!(
            roles(&p, &tls(None, &[], &["spiffe://example.org/cp1"])),
            ["operator"]
        );
        // A CN is not a SAN, nor the other way round, and matching is exact.
        assert!(roles(&p, &tls(Some("cp1.example.org"), &[], &[])).is_empty());
        assert!(roles(&p, &tls(None, &["dash"], &[])).is_empty());
        assert!(roles(&p, &tls(Some("Dash"), &[], &[])).is_empty());
        // With entries, root is nothing special.
        let p = policy("[[policy]]\nrole = \"viewer\"\nunix_uids = [1000]\n");
        assert!(roles(&p, &Peer::Unix { uid: 0, gid: 0 }).is_empty());
    }

    #[test]
    fn roles_include_lower_ones() {
        let c = Caller {
            name: "uid:1".into(),
            roles: [Role::Operator].into(),
        };
        assert!(c.has(Role::Viewer) && c.has(Role::Operator) && !c.has(Role::Admin));
        assert_eq!(c.roles_text(), "operator");
        let none = Caller {
            name: "uid:2".into(),
            roles: BTreeSet::new(),
        };
        assert!(!none.has(Role::Viewer));
        assert_eq!(none.roles_text(), "none");
    }

    #[test]
    fn peers_name_themselves() {
        assert_eq!(
            Peer::Unix {
                uid: 1000,
                gid: 100
            }
            .name(),
            "uid:1000"
        );
        assert_eq!(
            Peer::Unix {
                uid: 1000,
                gid: 100
            }
            .describe(),
            "uid 1000 (gid 100)"
        );
        assert_eq!(tls(Some("cp1"), &["a"], &[]).name(), "tls:CN=cp1");
        assert_eq!(tls(None, &["a.example"], &[]).name(), "tls:DNS=a.example");
    }

    #[test]
    fn supplementary_groups_come_from_the_user_database() {
        // root's groups include its primary group; an unknown uid has only its own.
        assert!(groups_of(0, 0).contains(&0));
        assert_eq!(groups_of(4_000_000_000, 77), [77]);
    }

    #[test]
    fn reload_keeps_the_old_trust_when_the_new_one_is_bad() {
        let t = Trust::new(&Config::default()).unwrap();
        assert!(t.policy().is_empty());
        let mut cfg = Config::parse("[[policy]]\nrole = \"viewer\"\nunix_uids = [5]\n").unwrap();
        t.reload(&cfg).unwrap();
        assert_eq!(t.policy().len(), 1);
        cfg.policy[0].role = "boss".into();
        let e = t.reload(&cfg).unwrap_err();
        assert!(e.to_string().contains("boss"), "{e}");
        assert_eq!(t.policy().len(), 1);
        // [tls] cannot appear by reload: the listener is bound at start.
        cfg.policy[0].role = "viewer".into();
        cfg.tls = Some(Default::default());
        assert!(t.reload(&cfg).unwrap_err().to_string().contains("restart"));
    }
}
