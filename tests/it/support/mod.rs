//! Shared helpers of the integration tests: [`daemon`] (a real imaged and imagectl), [`lab`]
//! (libvirt and real guests) and [`servers`] (real Glance, Keystone and S3, and a faulty proxy).

pub mod daemon;
pub mod lab;
pub mod servers;
