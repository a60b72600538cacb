//! Shared helpers of the integration tests: `mod common;` in a test file, then
//! `common::daemon` (a real imaged and imagectl) or `common::lab` (libvirt and a real guest).
// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

pub mod daemon;
pub mod lab;
pub mod servers;
