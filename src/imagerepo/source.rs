//! The catalog and the chunk store as the source of download links' bytes: a link names an
//! image and the content digest of the version it was made for, so a recapture after the link
//! was made ends it (NOT_FOUND) instead of serving other bytes under the same URL.
//!
//! The HTTP side (`download::serve`, the signer, `download::ImageSource`) is its own module,
//! written beside this one; [`RepoSource`] has that trait's two methods, and the
//! `impl download::ImageSource for RepoSource` is joined when both are merged.

use std::sync::Arc;

use super::catalog::{Catalog, ImageRef};
use super::chunks::ChunkStore;
use crate::error::Result;
use crate::repo::{DataChunk, Digest};

/// Image bytes for download links.
#[derive(Clone)]
pub struct RepoSource {
    catalog: Arc<Catalog>,
    chunks: Arc<dyn ChunkStore>,
}

impl RepoSource {
    /// The source over `catalog` and `chunks`.
    pub fn new(catalog: Arc<Catalog>, chunks: Arc<dyn ChunkStore>) -> RepoSource {
        RepoSource { catalog, chunks }
    }

    /// The virtual size and data chunks of `image` (`projects/p/images/id`), if its current
    /// version still has `content_digest`.
    pub fn manifest(&self, image: &str, content_digest: &str) -> Result<(u64, Vec<DataChunk>)> {
        let r = ImageRef::parse(image, "image")?;
        self.catalog.manifest_of_version(&r, content_digest)
    }

    /// One chunk's bytes.
    pub fn read_chunk(&self, digest: &Digest, buf: &mut Vec<u8>) -> Result<()> {
        self.chunks.read(digest, buf)
    }
}
