//! Where chunk bytes live: the [`ChunkStore`] trait (small, so an S3 backend can follow) and
//! its local-directory implementation, [`LocalChunks`].
//!
//! Layout, the same as the agent's local repository (`crate::repo`): `chunks/ab/abcd…` named by
//! the sha256 of their bytes, written to `tmp/` first and renamed into place, so a chunk file
//! is whole or absent. Every chunk is re-hashed before it is stored ([`verify`]); a mismatch
//! is INVALID_ARGUMENT (DIGEST_MISMATCH) naming the digest. [`ChunkStore::sync`] makes every
//! stored chunk durable at once (syncfs) before a commit turns an image ACTIVE.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use sha2::{Digest as _, Sha256};

use crate::error::{invalid, Error, Result};
use crate::repo::{Digest, CHUNK_SIZE};
use crate::util;

/// Checks that `data` hashes to `digest` (and is not larger than a chunk).
pub fn verify(digest: &Digest, data: &[u8]) -> Result<()> {
    if data.len() as u64 > CHUNK_SIZE {
        return Err(invalid(format!(
            "chunk {} is {} bytes: a chunk is at most {CHUNK_SIZE} bytes",
            hex::encode(digest),
            data.len()
        ))
        .with_reason("CHUNK_TOO_LARGE")
        .with_subject(format!("chunks/{}", hex::encode(digest))));
    }
    let got: Digest = Sha256::digest(data).into();
    if &got != digest {
        return Err(invalid(format!(
            "chunk {}: its {} bytes hash to {}, not to the digest they were sent under",
            hex::encode(digest),
            data.len(),
            hex::encode(got)
        ))
        .with_reason("DIGEST_MISMATCH")
        .with_field("digest")
        .with_subject(format!("chunks/{}", hex::encode(digest))));
    }
    Ok(())
}

/// Parses a lowercase hex sha256 digest; `field` names the request field in the error.
pub fn parse_digest(text: &str, field: &str) -> Result<Digest> {
    let mut d = [0u8; 32];
    if text.len() != 64 || text.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(invalid(format!(
            "{field}: {text:?} is not a lowercase hex sha256 digest (64 characters)"
        ))
        .with_reason("BAD_DIGEST")
        .with_field(field));
    }
    hex::decode_to_slice(text, &mut d).map_err(|_| {
        invalid(format!("{field}: {text:?} is not a hex sha256 digest"))
            .with_reason("BAD_DIGEST")
            .with_field(field)
    })?;
    Ok(d)
}

/// Chunk bytes by digest. Blocking: call from a blocking thread.
pub trait ChunkStore: Send + Sync {
    /// True when the chunk is stored.
    fn has(&self, digest: &Digest) -> Result<bool>;
    /// Stores `data` under `digest` after checking it hashes to it ([`verify`]). Storing a
    /// chunk that is present already is fine. Returns true when it was newly written.
    fn put(&self, digest: &Digest, data: &[u8]) -> Result<bool>;
    /// Reads a chunk's bytes into `buf` (replacing its contents).
    fn read(&self, digest: &Digest, buf: &mut Vec<u8>) -> Result<()>;
    /// Makes every chunk stored so far durable.
    fn sync(&self) -> Result<()>;
    /// Every stored chunk and when it was written (for the collector).
    fn list(&self) -> Result<Vec<(Digest, SystemTime)>>;
    /// Removes a chunk (absent is fine).
    fn remove(&self, digest: &Digest) -> Result<()>;
}

/// Chunks as files under a directory.
pub struct LocalChunks {
    root: PathBuf,
}

impl LocalChunks {
    /// Opens (creating) the store at `root` (its `tmp/` beside `chunks/` is emptied).
    pub fn open(root: &Path) -> Result<LocalChunks> {
        use std::os::unix::fs::DirBuilderExt;
        for d in [root.to_path_buf(), root.join("tmp")] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d)
                .map_err(|e| Error::io(format!("creating chunk directory {}", d.display()), e))?;
        }
        if let Ok(rd) = std::fs::read_dir(root.join("tmp")) {
            for e in rd.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(LocalChunks {
            root: root.to_path_buf(),
        })
    }

    /// The file of a chunk.
    pub fn path(&self, digest: &Digest) -> PathBuf {
        let h = hex::encode(digest);
        self.root.join(&h[..2]).join(h)
    }
}

impl ChunkStore for LocalChunks {
    fn has(&self, digest: &Digest) -> Result<bool> {
        Ok(self.path(digest).exists())
    }

    fn put(&self, digest: &Digest, data: &[u8]) -> Result<bool> {
        verify(digest, data)?;
        let path = self.path(digest);
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == data.len() as u64) {
            return Ok(false);
        }
        let h = hex::encode(digest);
        let tmp = self.root.join("tmp").join(util::random_id(&h[..16]));
        let write = || -> std::io::Result<()> {
            // Around the page cache; `sync` (syncfs) before a commit makes it durable.
            crate::repo::direct::write_file(&tmp, data)?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io(format!("storing chunk {h} in {}", self.root.display()), e)
        })?;
        Ok(true)
    }

    fn read(&self, digest: &Digest, buf: &mut Vec<u8>) -> Result<()> {
        use std::io::Read;
        let path = self.path(digest);
        buf.clear();
        std::fs::File::open(&path)
            .and_then(|mut f| f.read_to_end(buf))
            .map_err(|e| Error::io(format!("reading chunk file {}", path.display()), e))?;
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        crate::repo::syncfs(&self.root)
    }

    fn list(&self) -> Result<Vec<(Digest, SystemTime)>> {
        let mut out = Vec::new();
        let rd = std::fs::read_dir(&self.root)
            .map_err(|e| Error::io(format!("listing {}", self.root.display()), e))?;
        for sub in rd.flatten() {
            let name = sub.file_name();
            if name.len() != 2 || !sub.path().is_dir() {
                continue;
            }
            let Ok(files) = std::fs::read_dir(sub.path()) else {
                continue;
            };
            for f in files.flatten() {
                let n = f.file_name().to_string_lossy().into_owned();
                let Ok(d) = parse_digest(&n, "file") else {
                    continue;
                };
                let mtime = f
                    .metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                out.push((d, mtime));
            }
        }
        Ok(out)
    }

    fn remove(&self, digest: &Digest) -> Result<()> {
        let p = self.path(digest);
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("removing chunk file {}", p.display()), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_verified_stored_read_listed_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalChunks::open(&dir.path().join("chunks")).unwrap();
        let data = b"hello chunk".to_vec();
        let d: Digest = Sha256::digest(&data).into();
        assert!(!s.has(&d).unwrap());
        let e = s.put(&[7u8; 32], &data).unwrap_err();
        assert_eq!(e.facts().reason, "DIGEST_MISMATCH");
        assert!(e.to_string().contains(&hex::encode([7u8; 32])), "{e}");
        assert!(s.put(&d, &data).unwrap());
        assert!(!s.put(&d, &data).unwrap());
        assert!(s
            .path(&d)
            .starts_with(dir.path().join("chunks").join(&hex::encode(d)[..2])));
        let mut buf = Vec::new();
        s.read(&d, &mut buf).unwrap();
        assert_eq!(buf, data);
        s.sync().unwrap();
        assert_eq!(s.list().unwrap().len(), 1);
        s.remove(&d).unwrap();
        assert!(!s.has(&d).unwrap());
        s.remove(&d).unwrap();
    }

    #[test]
    fn digests_are_lowercase_hex_of_32_bytes() {
        assert!(parse_digest(&"ab".repeat(32), "d").is_ok());
        assert!(parse_digest(&"AB".repeat(32), "d").is_err());
        assert!(parse_digest("abc", "d").is_err());
        assert!(parse_digest(&"zz".repeat(32), "d").is_err());
    }
}
