//! imaged: the host agent that turns libvirt/QEMU guest disks into images.
//!
//! The crate is laid out the way data and control flow through it:
//!
//! - [`api`]: the gRPC transport (thin): decodes requests, calls [`ops`], encodes answers.
//! - [`ops`]: the one internal API. Every action (capture, import, export, delete, cancel)
//!   is an operation with a state machine, progress and a per-domain lock.
//! - [`hypervisor`]: what we need from the hypervisor, behind a trait; [`hypervisor::libvirt`]
//!   is the real backend.
//! - [`capture`]: the data path: a block source (qemu-nbd + our [`nbd`] client) cut into
//!   4 MiB chunks, hashed, zero chunks recognised, handed to a chunk sink.
//! - [`repo`]: the local content-addressed repository (chunks + image manifests).
//! - [`export`]: rebuilds raw or qcow2 files from a manifest in one forward pass.
//! - [`hostfile`]: image files created on the host (mode, no symbolic links followed).
//! - [`config`], [`error`]: the daemon's settings and the error kinds that map to gRPC codes.
//! - [`cli`]: `imagectl`, the admin's command line (a gRPC client).

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
pub mod nbd;
pub mod ops;
pub mod progress;
pub mod repo;
pub mod upload;
pub mod util;

#[cfg(test)]
mod layering;

/// Generated protobuf and gRPC code for `imaged.v1`.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("imaged.v1");

    /// Encoded file descriptor set, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("imaged_descriptor");
}
