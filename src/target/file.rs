//! A file on this host as a stream target: the same byte stream a remote target gets, written
//! under a temp name in the destination's directory, fsynced and renamed into place, so the
//! destination is either absent or whole. Runs of zeros are skipped with a seek (a raw stream
//! becomes a sparse file).

use std::path::{Path, PathBuf};

use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

use super::{StreamFactory, StreamTarget, UploadMeta, Uploaded};
use crate::error::{invalid, precondition, Error, ErrorKind, Result};
use crate::repo::manifest::is_zero;

/// Writes one file.
pub struct FileTarget {
    path: PathBuf,
    overwrite: bool,
}

impl FileTarget {
    /// A target writing `path` (absolute; replaced only with `overwrite`).
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
        })
    }
}

/// Checks that `path` can be written as a new file: its directory exists, and it does not exist
/// (or is a regular file and `overwrite` is set). `what` names it in messages ("export path").
pub fn check_destination(path: &Path, overwrite: bool, what: &str) -> Result<()> {
    if !path.parent().is_some_and(|d| d.is_dir()) {
        return Err(precondition(format!(
            "{what} {}: its directory does not exist",
            path.display()
        )));
    }
    match std::fs::symlink_metadata(path) {
        Ok(_) if !overwrite => Err(Error::new(
            ErrorKind::AlreadyExists,
            format!(
                "{what} {} exists; pass overwrite to replace it",
                path.display()
            ),
        )),
        Ok(md) if !md.is_file() => Err(precondition(format!(
            "{what} {} exists and is not a regular file",
            path.display()
        ))),
        _ => Ok(()),
    }
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
        self.check().await?;
        let dir = self.path.parent().unwrap_or(Path::new("/"));
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!(".{name}.{}.part", crate::util::random_id("w")));
        let res = write(&tmp, meta, body).await;
        let res = match res {
            Ok(sha256) => {
                if !self.overwrite && self.path.exists() {
                    Err(Error::new(
                        ErrorKind::AlreadyExists,
                        format!("target file {} appeared meanwhile", self.path.display()),
                    ))
                } else {
                    tokio::fs::rename(&tmp, &self.path)
                        .await
                        .map_err(|e| Error::io(format!("renaming into {}", self.path.display()), e))
                        .and_then(|()| {
                            crate::util::fsync_dir(dir)
                                .map_err(|e| Error::io(format!("syncing {}", dir.display()), e))
                        })
                        .map(|()| sha256)
                }
            }
            Err(e) => Err(e),
        };
        match res {
            Ok(sha256) => Ok(Uploaded {
                location: self.path.to_string_lossy().into_owned(),
                size: meta.size,
                sha256,
                sha512: String::new(),
            }),
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                Err(e)
            }
        }
    }
}

async fn write(tmp: &Path, meta: &UploadMeta, body: StreamFactory<'_>) -> Result<String> {
    let werr = |e: std::io::Error| Error::io(format!("writing {}", tmp.display()), e);
    let mut f = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(tmp)
        .await
        .map_err(werr)?;
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
    f.sync_all().await.map_err(werr)?;
    Ok(hex::encode(hash.finalize()))
}
