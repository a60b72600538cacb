//! `imagerepo`: the central image repository, a server of its own beside the agents.
//!
//! Agents (`imaged`) send it the chunks it lacks and commit manifests (the chunk protocol);
//! control planes and `imagectl repo` manage the catalog: projects, tags, recycle bin, quotas,
//! sharing, images in use, download links. The API is `proto/imagerepo/v1/imagerepo.proto`.
pub mod download;
