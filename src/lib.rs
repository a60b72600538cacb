//! imaged: the host agent that turns libvirt/QEMU guest disks into images.
//!
//! The crate is laid out the way control and data flow through it, top down; a module uses
//! only modules below it (checked by the `layering` test):
//!
//! - [`imagerepo`]: the central image repository server (its own binary, `imagerepo`): chunk
//!   protocol, catalog, download links. It shares only leaves (and the TLS listener of [`api`])
//!   with the agent.
//! - Transports: [`api`] (gRPC, thin: decodes requests, calls [`ops`], encodes answers) and
//!   [`cli`] (`imagectl`, a gRPC client).
//! - [`ops`]: the one internal API, the [`ops::Controller`]. Every action (capture, plan prep,
//!   import, export, delete, cancel) with its preconditions; operations with their state
//!   machine, progress and per-domain lock, kept across restarts in the operations database
//!   ([`ops::store`], SQLite); the journal that finishes interrupted work; the
//!   capture state machine of each mode ([`ops::capture`]).
//! - [`config`]: the daemon's settings.
//! - The data road: [`capture`] (a block source through qemu-nbd or a backup export and our
//!   [`nbd`] client, cut into 4 MiB chunks, hashed, zero chunks recognised; or one byte
//!   stream), [`export`] (rebuilds raw or qcow2 files from the repository), [`upload`] (file,
//!   Glance, S3 over one HTTP executor).
//! - [`hypervisor`]: what we need from the hypervisor, behind one trait with typed operations;
//!   [`hypervisor::libvirt`] is the real backend, [`hypervisor::fake`] the in-memory one.
//! - [`guest`]: the QEMU guest agent client and the Linux image-prep steps.
//! - Storage and leaves: [`repo`] (content-addressed chunks and manifests), [`format`](mod@format) (qcow2
//!   encoder, format names, byte streams), [`progress`] (counters and cancel), [`hostfile`]
//!   (files created on the host), [`util`], [`error`] (kinds that map to gRPC codes).

pub mod api;
pub mod capture;
pub mod cli;
pub mod config;
pub mod error;
pub mod export;
pub mod format;
pub mod guest;
pub mod hostfile;
pub mod hypervisor;
pub mod imagerepo;
pub mod nbd;
pub mod ops;
pub mod progress;
pub mod repo;
pub mod upload;
pub mod util;

#[cfg(test)]
mod layering;

/// Generated protobuf and gRPC code: `imaged.v1` (re-exported here) and the standard
/// `google.longrunning` and `google.api` packages it uses.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    pub use self::imaged::v1::*;

    /// The `imaged` package.
    pub mod imaged {
        /// `imaged.v1`.
        pub mod v1 {
            tonic::include_proto!("imaged.v1");
        }
    }

    /// The central repository's package.
    pub mod imagerepo {
        /// `imagerepo.v1`: the chunk protocol and the image catalog.
        pub mod v1 {
            tonic::include_proto!("imagerepo.v1");
        }
    }

    /// Google's API packages.
    pub mod google {
        /// `google.longrunning`: Operation and the Operations service.
        pub mod longrunning {
            tonic::include_proto!("google.longrunning");
        }
        /// `google.api`: field behaviour and resource annotations.
        pub mod api {
            tonic::include_proto!("google.api");
        }
        /// `google.rpc`: Status and error details, from tonic-types.
        pub use tonic_types::pb as rpc;
    }

    /// Encoded file descriptor set, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("imaged_descriptor");
}
