//! A file on this host as a stream target: the same byte stream a remote target gets, written
//! under a temp name in the destination's directory, fsynced and renamed into place, so the
//! destination is either absent or whole. Runs of zeros are skipped with a seek (a raw stream
//! becomes a sparse file). The file is created with the configured mode (`[export] file_mode`,
//! 0600 by default) through a descriptor of its directory, never through a symbolic link
//! ([`crate::hostfile`]).

use std::path::{Path, PathBuf};

use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

use super::{StreamFactory, StreamTarget, UploadMeta, Uploaded};
use crate::error::{invalid, Error, ErrorKind, Result};
use crate::hostfile::{Destination, DEFAULT_MODE};
use crate::util::is_zero;

/// Writes one file.
pub struct FileTarget {
    path: PathBuf,
    overwrite: bool,
    mode: u32,
}

impl FileTarget {
    /// A target writing `path` (absolute; replaced only with `overwrite`), mode 0600.
    pub fn new(path: &Path, overwrite: bool) -> Result<FileTarget> {
        if !path.is_absolute() {
            return Err(invalid(format!(
                "target file {} must be an absolute path",
                path.display()
            )));
        }
        Ok(FileTarget {
            path: path.to_path_buf(),
            overwrite,
            mode: DEFAULT_MODE,
        })
    }

    /// The same target creating its file with permission bits `mode`.
    pub fn with_mode(mut self, mode: u32) -> FileTarget {
        self.mode = mode;
        self
    }
}

/// Checks that `path` can be written as a new file: its directory exists and is reached
/// without a symbolic link, and the name is not a link and does not exist (or is a regular
/// file and `overwrite` is set). `what` names it in messages ("export path").
pub fn check_destination(path: &Path, overwrite: bool, what: &str) -> Result<()> {
    Destination::open(path, overwrite, what).map(drop)
}

#[tonic::async_trait]
impl StreamTarget for FileTarget {
    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }

    async fn check(&self) -> Result<()> {
        check_destination(&self.path, self.overwrite, "target file")
    }

    async fn upload(&self, meta: &UploadMeta, body: StreamFactory<'_>) -> Result<Uploaded> {
        let new =
            Destination::open(&self.path, self.overwrite, "target file")?.create(self.mode)?;
        let f = new
            .file()
            .try_clone()
            .map_err(|e| Error::io(format!("target file {}", self.path.display()), e))?;
        let sha256 = write(tokio::fs::File::from_std(f), &self.path, meta, body).await?;
        let overwrite = self.overwrite;
        tokio::task::spawn_blocking(move || new.commit(overwrite))
            .await
            .map_err(|e| crate::error::internal("a blocking task failed").with_source(e))??;
        Ok(Uploaded {
            location: self.path.to_string_lossy().into_owned(),
            size: meta.size,
            sha256,
            sha512: None,
        })
    }
}

async fn write(
    mut f: tokio::fs::File,
    dest: &Path,
    meta: &UploadMeta,
    body: StreamFactory<'_>,
) -> Result<String> {
    let werr = |e: std::io::Error| Error::io(format!("writing target file {}", dest.display()), e);
    let mut stream = body();
    let mut hash = Sha256::new();
    let mut written = 0u64;
    while let Some(piece) = stream.next().await {
        let piece = piece?;
        hash.update(&piece);
        if is_zero(&piece) {
            f.seek(std::io::SeekFrom::Current(piece.len() as i64))
                .await
                .map_err(werr)?;
        } else {
            f.write_all(&piece).await.map_err(werr)?;
        }
        written += piece.len() as u64;
    }
    if written != meta.size {
        return Err(Error::new(
            ErrorKind::Internal,
            format!(
                "image {}: the stream held {written} bytes, {} were announced",
                meta.name, meta.size
            ),
        ));
    }
    f.set_len(written).await.map_err(werr)?;
    // Settle tokio's pending write before the file is synced and renamed.
    f.flush().await.map_err(werr)?;
    Ok(hex::encode(hash.finalize()))
}
