//! The defaults of the upload destinations' settings, in one place: what a config file that
//! leaves a key out gets ([`super::glance::GlanceConfig`], [`super::s3::S3Config`]; their
//! `new` constructors use the same values). Serde names these functions in `default = "…"`.

/// `connect_timeout_secs`, every destination.
pub(crate) fn connect_timeout_secs() -> u64 {
    10
}

/// `stall_timeout_secs`, every destination: a transfer with no progress for this long fails.
pub(crate) fn stall_timeout_secs() -> u64 {
    60
}

/// A switch that is on unless turned off (`path_style`, `checksum_object`).
pub(crate) fn yes() -> bool {
    true
}

/// Keystone `user_domain` and `project_domain`.
pub(crate) fn keystone_domain() -> String {
    "Default".into()
}

/// Glance `interface` of the catalog endpoint.
pub(crate) fn glance_interface() -> String {
    "public".into()
}

/// Glance `visibility` of created images.
pub(crate) fn glance_visibility() -> String {
    "private".into()
}

/// Glance whole-upload `attempts`.
pub(crate) fn glance_attempts() -> u32 {
    2
}

/// Glance `import_timeout_secs`.
pub(crate) fn glance_import_timeout_secs() -> u64 {
    3600
}

/// Glance `cleanup_patience_secs`.
pub(crate) fn glance_cleanup_patience_secs() -> u64 {
    600
}

/// S3 `region`.
pub(crate) fn s3_region() -> String {
    "us-east-1".into()
}

/// S3 `min_part_size_mib`.
pub(crate) fn s3_min_part_size_mib() -> u64 {
    16
}

/// S3 `parts_in_flight`: what a real S3 over a long path needs to fill it, in 80–100 MiB of
/// memory at the default part size (a part holds the stream's 4 MiB buffers it touches).
pub(crate) fn s3_parts_in_flight() -> usize {
    4
}

/// S3 `part_retries`.
pub(crate) fn s3_part_retries() -> u32 {
    3
}

/// S3 `retry_backoff_ms`.
pub(crate) fn s3_retry_backoff_ms() -> u64 {
    500
}

/// S3 `complete_timeout_secs`.
pub(crate) fn s3_complete_timeout_secs() -> u64 {
    600
}
