//! Shared helpers of the integration tests: [`api`] (the API as tests read it), [`daemon`] (a real imaged and imagectl), [`repo_server`] (a real imagerepo), [`lab`]
//! (libvirt and real guests), [`libvirtd`] (the lock that keeps libvirt users away from a test
//! that stops libvirtd, and the stop/start helpers) and [`servers`] (real Glance, Keystone and
//! S3, and a faulty proxy).

pub mod api;
pub mod daemon;
pub mod lab;
pub mod libvirtd;
pub mod pki;
pub mod repo_server;
pub mod servers;
