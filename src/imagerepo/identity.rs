//! Who is calling the repository: the transport's peer (unix uid, or the verified TLS client
//! certificate, both read by [`crate::api::auth::Peer`]) mapped by the `[[policy]]` entries to
//! an admin, a service or a project, and from that the [`Principal`] a call acts as.
//!
//! A service names the project it acts for in the request metadata `x-imagerepo-project`; a
//! project acts only for itself; an admin for everyone. Without policy entries uid 0 on the
//! unix socket is admin and nobody else is anything.

use crate::api::auth::Peer;
use crate::error::{denied, invalid, Result};

use super::config::{validate_project, PolicyEntry, RepoRole};

/// The metadata key in which a service names the project it acts for.
pub const PROJECT_HEADER: &str = "x-imagerepo-project";

/// What a call acts as, for the catalog's rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// Sees and changes every project's images, quotas and the collector.
    Admin,
    /// One project: its own images, and the shared ones it accepted (read only).
    Project(String),
}

impl Principal {
    /// The project, for a project principal.
    pub fn project(&self) -> Option<&str> {
        match self {
            Principal::Admin => None,
            Principal::Project(p) => Some(p),
        }
    }

    /// For logs: `admin` or `project alpha`.
    pub fn describe(&self) -> String {
        match self {
            Principal::Admin => "admin".into(),
            Principal::Project(p) => format!("project {p}"),
        }
    }
}

/// The `[[policy]]` entries in force.
#[derive(Debug, Clone, Default)]
pub struct RepoPolicy {
    entries: Vec<PolicyEntry>,
}

impl RepoPolicy {
    /// The policy of checked entries (see [`super::config::RepoConfig::validate`]).
    pub fn new(entries: Vec<PolicyEntry>) -> RepoPolicy {
        RepoPolicy { entries }
    }

    /// The first matching entry's role and project: admin beats service beats project when
    /// several match.
    pub fn role_of(&self, peer: &Peer) -> Option<(RepoRole, String)> {
        if self.entries.is_empty() {
            return matches!(peer, Peer::Unix { uid: 0, .. })
                .then(|| (RepoRole::Admin, String::new()));
        }
        let mut best: Option<(RepoRole, String)> = None;
        let rank = |r: RepoRole| match r {
            RepoRole::Admin => 3,
            RepoRole::Service => 2,
            RepoRole::Project => 1,
        };
        for e in &self.entries {
            let hit = match peer {
                Peer::Unix { uid, .. } => e.unix_uids.contains(uid),
                Peer::Tls(id) => {
                    id.cn.as_ref().is_some_and(|cn| e.tls_subjects.contains(cn))
                        || id.sans().any(|s| e.tls_sans.contains(s))
                }
                Peer::Unknown => false,
            };
            let Some(role) = e.role() else { continue };
            if hit && best.as_ref().is_none_or(|(b, _)| rank(role) > rank(*b)) {
                best = Some((role, e.project.clone()));
            }
        }
        best
    }

    /// The principal of a call by `peer` with `header` the value of [`PROJECT_HEADER`].
    pub fn principal(&self, peer: &Peer, header: Option<&str>) -> Result<Principal> {
        match self.role_of(peer) {
            None => Err(denied(format!(
                "{} has no role in this repository's policy",
                peer.describe()
            ))
            .with_reason("ROLE_MISSING")
            .with_subject(peer.name())),
            Some((RepoRole::Admin, _)) => Ok(Principal::Admin),
            Some((RepoRole::Project, p)) => Ok(Principal::Project(p)),
            Some((RepoRole::Service, _)) => match header {
                Some(p) if !p.is_empty() => {
                    validate_project(p).map_err(|e| e.with_field(PROJECT_HEADER))?;
                    Ok(Principal::Project(p.to_string()))
                }
                _ => Err(invalid(format!(
                    "{} is a service: name the project it acts for in the request metadata \
                     {PROJECT_HEADER}",
                    peer.describe()
                ))
                .with_reason("PROJECT_MISSING")
                .with_field(PROJECT_HEADER)),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::auth::tls::TlsIdentity;

    fn entry(role: &str, project: &str, uids: &[u32], cns: &[&str]) -> PolicyEntry {
        PolicyEntry {
            role: role.into(),
            project: project.into(),
            unix_uids: uids.to_vec(),
            tls_subjects: cns.iter().map(|s| s.to_string()).collect(),
            tls_sans: vec![],
        }
    }

    #[test]
    fn default_policy_makes_root_admin_only() {
        let p = RepoPolicy::default();
        assert_eq!(
            p.principal(&Peer::Unix { uid: 0, gid: 0 }, None).unwrap(),
            Principal::Admin
        );
        let e = p
            .principal(&Peer::Unix { uid: 5, gid: 5 }, None)
            .unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::PermissionDenied);
    }

    #[test]
    fn services_name_their_project_and_projects_are_fixed() {
        let p = RepoPolicy::new(vec![
            entry("service", "", &[10], &[]),
            entry("project", "alpha", &[], &["alpha-ui"]),
        ]);
        let svc = Peer::Unix { uid: 10, gid: 10 };
        assert_eq!(
            p.principal(&svc, Some("beta")).unwrap(),
            Principal::Project("beta".into())
        );
        assert_eq!(
            p.principal(&svc, None).unwrap_err().facts().reason,
            "PROJECT_MISSING"
        );
        let tls = Peer::Tls(TlsIdentity {
            cn: Some("alpha-ui".into()),
            ..Default::default()
        });
        // A project's header cannot move it elsewhere.
        assert_eq!(
            p.principal(&tls, Some("beta")).unwrap(),
            Principal::Project("alpha".into())
        );
        assert!(p.principal(&Peer::Unix { uid: 0, gid: 0 }, None).is_err());
    }
}
