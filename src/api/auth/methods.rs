//! The one table from gRPC method to the role it needs. [`need`] answers for a request path;
//! a method the table does not know needs admin, so a method added to a service without a
//! row here is closed rather than open (and a unit test fails until it has its row).

use crate::config::Role;

/// What a method needs from its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Any connected peer (health probes of systemd and load balancers).
    Anyone,
    /// A role (or a higher one).
    Role(Role),
}

use Need::Anyone;
const VIEWER: Need = Need::Role(Role::Viewer);
const OPERATOR: Need = Need::Role(Role::Operator);
const ADMIN: Need = Need::Role(Role::Admin);

/// Every method served, by its full name (`package.Service/Method`), and what it needs.
#[rustfmt::skip]
pub const TABLE: &[(&str, Need)] = &[
    ("imaged.v1.DomainService/ListDomains", VIEWER),
    ("imaged.v1.DomainService/GetDomain", VIEWER),

    ("imaged.v1.ImageService/ListImages", VIEWER),
    ("imaged.v1.ImageService/GetImage", VIEWER),
    ("imaged.v1.ImageService/CaptureImage", OPERATOR),
    ("imaged.v1.ImageService/ImportImage", OPERATOR),
    ("imaged.v1.ImageService/ExportImage", OPERATOR),
    ("imaged.v1.ImageService/PlanPrep", OPERATOR),
    ("imaged.v1.ImageService/UpdateImage", OPERATOR),
    ("imaged.v1.ImageService/DeleteImage", ADMIN),

    ("imaged.v1.OperationService/GetOperation", VIEWER),
    ("imaged.v1.OperationService/ListOperations", VIEWER),
    ("imaged.v1.OperationService/WatchOperation", VIEWER),
    ("imaged.v1.OperationService/WaitOperation", VIEWER),
    ("imaged.v1.OperationService/CancelOperation", OPERATOR),
    ("imaged.v1.OperationService/DeleteOperation", ADMIN),

    ("google.longrunning.Operations/GetOperation", VIEWER),
    ("google.longrunning.Operations/ListOperations", VIEWER),
    ("google.longrunning.Operations/WaitOperation", VIEWER),
    ("google.longrunning.Operations/CancelOperation", OPERATOR),
    ("google.longrunning.Operations/DeleteOperation", ADMIN),

    ("grpc.health.v1.Health/Check", Anyone),
    ("grpc.health.v1.Health/Watch", Anyone),
    ("grpc.health.v1.Health/List", Anyone),
    ("grpc.reflection.v1.ServerReflection/ServerReflectionInfo", VIEWER),
    ("grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", VIEWER),
];

/// What the request path `/package.Service/Method` needs; admin for anything unknown.
pub fn need(path: &str) -> Need {
    let name = path.strip_prefix('/').unwrap_or(path);
    TABLE
        .iter()
        .find(|(m, _)| *m == name)
        .map(|(_, n)| *n)
        .unwrap_or(ADMIN)
}

/// The method's name for messages: the path without its leading '/'.
pub fn method_name(path: &str) -> &str {
    path.strip_prefix('/').unwrap_or(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// Every method of every service in an encoded file descriptor set.
    fn methods_of(fds: &[u8]) -> Vec<String> {
        let set = prost_types::FileDescriptorSet::decode(fds).unwrap();
        let mut out = Vec::new();
        for f in &set.file {
            for s in &f.service {
                for m in &s.method {
                    out.push(format!("{}.{}/{}", f.package(), s.name(), m.name()));
                }
            }
        }
        out
    }

    #[test]
    fn every_served_method_has_a_row() {
        // The descriptor set holds imagerepo.v1 too, which imaged does not serve: the
        // repository server judges its callers by its own policy (crate::imagerepo::identity).
        let mut served: Vec<String> = methods_of(crate::proto::FILE_DESCRIPTOR_SET)
            .into_iter()
            .filter(|m| !m.starts_with("imagerepo."))
            .collect();
        served.extend(methods_of(tonic_health::pb::FILE_DESCRIPTOR_SET));
        served.extend(methods_of(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET));
        served.extend(methods_of(
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ));
        assert!(served.len() > 10, "{served:?}");
        let missing: Vec<&String> = served
            .iter()
            .filter(|m| !TABLE.iter().any(|(t, _)| t == m))
            .collect();
        assert!(
            missing.is_empty(),
            "methods without a row in the table of src/api/auth/methods.rs: {missing:?}"
        );
    }

    #[test]
    fn rows_are_unique_and_lookups_follow_them() {
        for (i, (m, n)) in TABLE.iter().enumerate() {
            assert!(
                !TABLE[i + 1..].iter().any(|(o, _)| o == m),
                "{m} has two rows"
            );
            assert_eq!(need(&format!("/{m}")), *n, "{m}");
        }
        assert_eq!(need("/imaged.v1.ImageService/ListImages"), VIEWER);
        assert_eq!(need("/imaged.v1.ImageService/CaptureImage"), OPERATOR);
        assert_eq!(need("/imaged.v1.ImageService/DeleteImage"), ADMIN);
        assert_eq!(need("/grpc.health.v1.Health/Check"), Anyone);
        assert_eq!(need("/imaged.v1.ImageService/Brand_New"), ADMIN);
        assert_eq!(need("/"), ADMIN);
        assert_eq!(need(""), ADMIN);
        assert_eq!(method_name("/a.B/C"), "a.B/C");
    }
}
