//! `imagerepo`: the central image repository, a server of its own beside the agents.
//!
//! Agents (`imaged`) send it the chunks it lacks and commit manifests (the chunk protocol);
//! control planes and `imagectl repo` manage the catalog: projects, tags, recycle bin, quotas,
//! sharing, images in use, download links. The API is `proto/imagerepo/v1/imagerepo.proto`.
//!
//! - [`config`]: the server's TOML config with embedded defaults;
//! - [`identity`]: who calls (unix uid or client certificate) mapped to admin, service or
//!   project by the policy;
//! - [`catalog`]: the image catalog (SQLite), every rule of the API as a plain Rust method;
//! - [`chunks`]: chunk bytes by digest (a local directory; the trait leaves room for S3);
//! - [`service`]: the gRPC services, thin over the catalog and the chunk store;
//! - [`gc`]: the garbage collector, the recycle bin's retention and idle uploads;
//! - [`source`]: the catalog and chunks as the source of download links;
//! - [`server`]: the listeners, health, reflection, readiness and a clean stop.

pub mod catalog;
pub mod chunks;
pub mod config;
pub mod gc;
pub mod identity;
pub mod server;
pub mod service;
pub mod source;

/// The domain of every `google.rpc.ErrorInfo` the repository sends.
pub const ERROR_DOMAIN: &str = "imagerepo";
