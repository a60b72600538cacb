//! Image files written on this host (exports, the file stream target), created safely.
//!
//! A guest's disk must not become readable by every local user, and a request must not be
//! able to make the root daemon write through a symbolic link planted by someone else. So a
//! destination is handled through a file descriptor of its directory:
//!
//! 1. [`Destination::open`] opens the directory without following a symbolic link in *any*
//!    component: `openat2(RESOLVE_NO_SYMLINKS)` where the kernel has it, otherwise a walk from
//!    `/` that opens each component with `O_NOFOLLOW | O_DIRECTORY`. A link anywhere in the
//!    path, or at the final name, is refused, naming it.
//! 2. [`Destination::create`] makes a temp file beside the final name with
//!    `openat(O_CREAT | O_EXCL | O_NOFOLLOW)` and sets its mode exactly (the umask does not
//!    apply), so the bytes never sit in a file with wider permissions.
//! 3. [`NewFile::commit`] fsyncs the file, renames it into place with `renameat2` (no
//!    replacing unless asked) and fsyncs the directory. A [`NewFile`] dropped before that
//!    removes its temp file.
//!
//! Where a request may touch the host at all is limited to configured directories
//! ([`check_opened_within`], [`check_destination_within`]): the check reads the real path of
//! the *opened* descriptor (`/proc/self/fd/N`) and compares it component by component with the
//! allowed directories (canonical, resolved once at start), so neither a symbolic link, nor
//! `..`, nor a rename between check and use leads out of them.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use crate::error::{denied, invalid, precondition, Error, ErrorKind, Result};

/// The mode of image files when the config does not say otherwise: the owner (root) only.
pub const DEFAULT_MODE: u32 = 0o600;

/// Parses an octal permission string ("0600", "640", "0o640") for image files. World-writable
/// modes are refused: anyone could then change an image before it is used. `key` names the
/// setting in messages.
pub fn parse_mode(s: &str, key: &str) -> Result<u32> {
    let digits = s.trim().trim_start_matches("0o");
    let mode = match u32::from_str_radix(digits, 8) {
        Ok(m) if !digits.is_empty() && m <= 0o777 => m,
        _ => {
            return Err(invalid(format!(
                "{key} must be octal permission bits like \"0600\", got {s:?}"
            )))
        }
    };
    if mode & 0o002 != 0 {
        return Err(invalid(format!(
            "{key} {s:?} lets every user of the host write image files; \
             drop the world-write bit (e.g. \"0600\" or \"0640\")"
        )));
    }
    Ok(mode)
}

/// Removes the temp files that writers of the destination `path` left when their process
/// died (see [`Destination::remove_temp_files`]); the final file is not touched.
pub fn remove_temp_files(path: &Path) -> Result<usize> {
    Destination::open(path, true, "destination")?.remove_temp_files()
}

/// True when the real path `real` is one of `allowed` (canonical directories) or lies under
/// one. Compares whole components: `/srv/importer` is not under `/srv/import`.
pub fn is_within(real: &Path, allowed: &[PathBuf]) -> bool {
    allowed.iter().any(|a| real.starts_with(a))
}

/// The real path of an open descriptor, as the kernel resolved it when it was opened.
fn real_path_of(fd: &impl AsRawFd) -> io::Result<PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

fn outside(what: &str, shown: &Path, real: Option<&Path>, allowed: &[PathBuf]) -> Error {
    let list: Vec<String> = allowed.iter().map(|a| a.display().to_string()).collect();
    let resolved = match real {
        Some(r) if r != shown => format!(" (it resolves to {})", r.display()),
        _ => String::new(),
    };
    denied(format!(
        "{what} {}{resolved} is outside the directories this daemon may use for it ({}); \
         move the file into one of them or add its directory to the daemon's [paths]",
        shown.display(),
        if list.is_empty() {
            "none".to_string()
        } else {
            list.join(", ")
        }
    ))
    .with_reason("PATH_NOT_ALLOWED")
}

/// The real path `path` names, as far as it exists: the longest existing ancestor
/// canonicalized, the rest appended. `None` when the rest holds `..` (it cannot be judged).
fn resolve_lexically(path: &Path) -> Option<PathBuf> {
    let mut missing: Vec<&OsStr> = Vec::new();
    let mut cur = path;
    loop {
        if let Ok(real) = std::fs::canonicalize(cur) {
            let mut out = real;
            for m in missing.iter().rev() {
                out.push(m);
            }
            return Some(out);
        }
        match (cur.parent(), cur.components().next_back()) {
            (Some(parent), Some(Component::Normal(name))) => {
                missing.push(name);
                cur = parent;
            }
            _ => return None,
        }
    }
}

/// A first look at the path string: refused when it plainly leads outside `allowed`, before
/// anything is opened (so nothing is learnt about files outside). Not the guard itself: the
/// checks on the opened descriptor are.
pub fn precheck_within(path: &Path, allowed: &[PathBuf], what: &str) -> Result<()> {
    match resolve_lexically(path) {
        Some(real) if is_within(&real, allowed) => Ok(()),
        real => Err(outside(what, path, real.as_deref(), allowed)),
    }
}

/// Refuses an opened host file (`file`, opened from `shown`) whose real path is outside
/// `allowed` (canonical directories). PERMISSION_DENIED names the path and the directories.
pub fn check_opened_within(
    file: &impl AsRawFd,
    shown: &Path,
    allowed: &[PathBuf],
    what: &str,
) -> Result<()> {
    let real = real_path_of(file).map_err(|e| {
        Error::io(
            format!("{what} {}: reading its real path", shown.display()),
            e,
        )
    })?;
    if is_within(&real, allowed) {
        Ok(())
    } else {
        Err(outside(what, shown, Some(&real), allowed))
    }
}

/// Checks that `path` may be written as a new file under one of `allowed`: the string first,
/// then its directory opened as [`Destination::open`] does (no symbolic links; the name
/// absent, or a regular file with `overwrite`) and the real path of that descriptor.
pub fn check_destination_within(
    path: &Path,
    overwrite: bool,
    allowed: &[PathBuf],
    what: &str,
) -> Result<()> {
    precheck_within(path, allowed, what)?;
    let dest = Destination::open(path, overwrite, what)?;
    dest.check_within(allowed)
}

/// The directory of a destination file, opened without following symbolic links, and the
/// file's name in it.
#[derive(Debug)]
pub struct Destination {
    path: PathBuf,
    what: String,
    dir: OwnedFd,
    name: Vec<u8>,
}

/// A temp file beside a [`Destination`]; removed when dropped uncommitted.
#[derive(Debug)]
pub struct NewFile {
    dest: Destination,
    tmp: CString,
    file: File,
    committed: bool,
}

/// Why a directory could not be opened safely.
enum DirProblem {
    Symlink(PathBuf),
    NotDir(PathBuf),
    Missing(PathBuf),
    Io(PathBuf, io::Error),
}

impl Destination {
    /// Opens the directory of `path` (absolute, no `..`) with no symbolic link followed, and
    /// checks the final name: absent, or a regular file when `overwrite` is set; never a link.
    /// `what` names the path in messages ("export path").
    pub fn open(path: &Path, overwrite: bool, what: &str) -> Result<Destination> {
        let shown = path.display();
        if !path.is_absolute() {
            return Err(invalid(format!("{what} {shown} must be an absolute path")));
        }
        if path.components().any(|c| c == Component::ParentDir) {
            return Err(invalid(format!(
                "{what} {shown} must not contain '..': give the path without it"
            )));
        }
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(invalid(format!("{what} {shown} names no file")));
        };
        let dir_fd = open_dir(dir).map_err(|p| match p {
            DirProblem::Symlink(link) => precondition(format!(
                "{what} {shown}: {} is a symbolic link; image files are written only through \
                 real directories (a link could point anywhere on the host): give the path \
                 without links",
                link.display()
            )),
            DirProblem::NotDir(p) => precondition(format!(
                "{what} {shown}: {} is not a directory",
                p.display()
            )),
            DirProblem::Missing(p) => precondition(format!(
                "{what} {shown}: its directory does not exist ({} is missing)",
                p.display()
            )),
            DirProblem::Io(p, e) => Error::io(
                format!("{what} {shown}: opening directory {}", p.display()),
                e,
            ),
        })?;
        let dest = Destination {
            path: path.to_path_buf(),
            what: what.to_string(),
            dir: dir_fd,
            name: name.as_bytes().to_vec(),
        };
        dest.check_name(overwrite)?;
        Ok(dest)
    }

    /// The destination path, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Refuses the destination when its opened directory is outside `allowed`.
    pub fn check_within(&self, allowed: &[PathBuf]) -> Result<()> {
        check_opened_within(&self.dir, &self.path, allowed, &self.what)
    }

    fn check_name(&self, overwrite: bool) -> Result<()> {
        let shown = self.path.display();
        let what = &self.what;
        let st = match stat_at(&self.dir, &cstr(&self.name)?) {
            Ok(Some(st)) => st,
            Ok(None) => return Ok(()),
            Err(e) => return Err(Error::io(format!("{what} {shown}: looking at it"), e)),
        };
        match st.st_mode & libc::S_IFMT {
            libc::S_IFLNK => Err(precondition(format!(
                "{what} {shown} is a symbolic link; image files are never written through a \
                 link: remove it or give another path"
            ))),
            _ if !overwrite => Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("{what} {shown} exists; pass overwrite to replace it"),
            )),
            libc::S_IFREG => Ok(()),
            _ => Err(precondition(format!(
                "{what} {shown} exists and is not a regular file"
            ))),
        }
    }

    /// The start of the temp file names of this destination: `.NAME.` (the name cut at 128
    /// bytes), followed by a random `w-…` id and `.part`.
    fn temp_prefix(&self) -> Vec<u8> {
        let mut tmp = b".".to_vec();
        // Keep the temp name within NAME_MAX however long the final name is.
        tmp.extend_from_slice(&self.name[..self.name.len().min(128)]);
        tmp.extend_from_slice(b".w-");
        tmp
    }

    /// Removes the temp files a writer of this destination left when its process died
    /// (regular files named as [`Destination::create`] names them; nothing else, no link).
    /// Returns how many went.
    pub fn remove_temp_files(&self) -> Result<usize> {
        let prefix = self.temp_prefix();
        let shown = self.path.display();
        let what = &self.what;
        // The directory as opened (no path walked again): its fd's entry in /proc.
        let listing = format!("/proc/self/fd/{}", self.dir.as_raw_fd());
        let rd = std::fs::read_dir(&listing)
            .map_err(|e| Error::io(format!("{what} {shown}: listing its directory"), e))?;
        let mut removed = 0;
        for entry in rd.flatten() {
            let name = entry.file_name();
            let bytes = name.as_bytes();
            let Some(rest) = bytes.strip_prefix(prefix.as_slice()) else {
                continue;
            };
            let Some(id) = rest.strip_suffix(b".part") else {
                continue;
            };
            if id.len() != 16 || !id.iter().all(u8::is_ascii_hexdigit) {
                continue;
            }
            let c = cstr(bytes)?;
            match stat_at(&self.dir, &c) {
                Ok(Some(st)) if st.st_mode & libc::S_IFMT == libc::S_IFREG => {}
                _ => continue,
            }
            // SAFETY: the directory fd is open and the name NUL-terminated.
            if unsafe { libc::unlinkat(self.dir.as_raw_fd(), c.as_ptr(), 0) } != 0 {
                let e = io::Error::last_os_error();
                return Err(Error::io(
                    format!(
                        "{what} {shown}: removing temp file {}",
                        String::from_utf8_lossy(bytes)
                    ),
                    e,
                ));
            }
            removed += 1;
        }
        Ok(removed)
    }

    /// Creates the temp file (mode `mode` exactly) that [`NewFile::commit`] renames into place.
    pub fn create(self, mode: u32) -> Result<NewFile> {
        let mut tmp = self.temp_prefix();
        tmp.extend_from_slice(&crate::util::random_id("w").as_bytes()[2..]);
        tmp.extend_from_slice(b".part");
        let tmp = cstr(&tmp)?;
        let what = format!(
            "{} {}: creating its temp file",
            self.what,
            self.path.display()
        );
        let cerr = |e: io::Error| Error::io(&what, e);
        let flags =
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: `self.dir` is an open directory fd and `tmp` a NUL-terminated name that
        // outlives the call; the returned fd is checked and then owned by `fd_result`.
        let fd = unsafe {
            libc::openat(
                self.dir.as_raw_fd(),
                tmp.as_ptr(),
                flags,
                mode as libc::c_uint,
            )
        };
        let file = File::from(fd_result(fd).map_err(cerr)?);
        let new = NewFile {
            dest: self,
            tmp,
            file,
            committed: false,
        };
        // The umask may have narrowed (or a default ACL widened) the mode: set it exactly.
        new.file
            .set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(cerr)?;
        Ok(new)
    }
}

impl NewFile {
    /// The open temp file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The destination path, for messages.
    pub fn path(&self) -> &Path {
        &self.dest.path
    }

    /// fsyncs the file, renames it to the destination name (replacing an existing file only
    /// with `overwrite`) and fsyncs the directory.
    pub fn commit(mut self, overwrite: bool) -> Result<()> {
        let shown = self.dest.path.display().to_string();
        let what = self.dest.what.clone();
        self.file
            .sync_all()
            .map_err(|e| Error::io(format!("{what} {shown}: syncing"), e))?;
        let name = cstr(&self.dest.name)?;
        let dir = self.dest.dir.as_raw_fd();
        let rename = |flags: libc::c_uint| {
            // SAFETY: both names are NUL-terminated and live across the call; `dir` is open.
            let r = unsafe { libc::renameat2(dir, self.tmp.as_ptr(), dir, name.as_ptr(), flags) };
            if r == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        };
        let res = if overwrite {
            rename(0)
        } else {
            match rename(libc::RENAME_NOREPLACE) {
                // A filesystem without RENAME_NOREPLACE: check, then a plain rename.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    match stat_at(&self.dest.dir, &name) {
                        Ok(None) => rename(0),
                        Ok(Some(_)) => Err(io::Error::from_raw_os_error(libc::EEXIST)),
                        Err(e) => Err(e),
                    }
                }
                other => other,
            }
        };
        match res {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!("{what} {shown} appeared meanwhile; pass overwrite to replace it"),
                ))
            }
            Err(e) => return Err(Error::io(format!("{what} {shown}: renaming into place"), e)),
            Ok(()) => self.committed = true,
        }
        // SAFETY: `dir` is an open directory fd owned by `self.dest`.
        if unsafe { libc::fsync(dir) } != 0 {
            let e = io::Error::last_os_error();
            return Err(Error::io(
                format!("{what} {shown}: syncing its directory"),
                e,
            ));
        }
        Ok(())
    }
}

impl Drop for NewFile {
    fn drop(&mut self) {
        if !self.committed {
            // SAFETY: the directory fd is open and the name NUL-terminated; a failure only
            // leaves a temp file behind.
            unsafe { libc::unlinkat(self.dest.dir.as_raw_fd(), self.tmp.as_ptr(), 0) };
        }
    }
}

fn cstr(bytes: &[u8]) -> Result<CString> {
    CString::new(bytes).map_err(|_| {
        invalid(format!(
            "path component {:?} holds a NUL byte",
            String::from_utf8_lossy(bytes)
        ))
    })
}

fn fd_result(fd: libc::c_int) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by the kernel to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// lstat of `name` in `dir`: `None` when it does not exist.
fn stat_at(dir: &OwnedFd, name: &CString) -> io::Result<Option<libc::stat>> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` is valid for writes of one `stat`; `name` is NUL-terminated; `dir` is open.
    let r = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r == 0 {
        // SAFETY: fstatat succeeded, so it filled `st`.
        return Ok(Some(unsafe { st.assume_init() }));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENOENT) {
        Ok(None)
    } else {
        Err(e)
    }
}

const DIR_FLAGS: libc::c_int = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC;

/// Opens directory `dir` (absolute, no `..`) without following any symbolic link: one
/// `openat2` when the kernel has it; the component walk to name the culprit when it fails, or
/// when `openat2` is missing or filtered.
fn open_dir(dir: &Path) -> std::result::Result<OwnedFd, DirProblem> {
    match open_dir_openat2(dir) {
        Some(Ok(fd)) => Ok(fd),
        _ => open_dir_walk(dir),
    }
}

/// `openat2(RESOLVE_NO_SYMLINKS)`; `None` when the call cannot be made at all.
fn open_dir_openat2(dir: &Path) -> Option<io::Result<OwnedFd>> {
    let c = CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: `open_how` is plain data; all-zero is a valid value that we then fill in.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = DIR_FLAGS as u64;
    how.resolve = libc::RESOLVE_NO_SYMLINKS;
    // SAFETY: the path is NUL-terminated and `how` is a valid `open_how` of the size passed;
    // both outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    let res = fd_result(fd as libc::c_int);
    match &res {
        // No openat2 (kernel < 5.6), or a seccomp filter refusing it: fall back.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS) | Some(libc::EPERM)) => None,
        _ => Some(res),
    }
}

/// The walk from `/`: each component opened with `O_NOFOLLOW | O_DIRECTORY` relative to the
/// previous one.
fn open_dir_walk(dir: &Path) -> std::result::Result<OwnedFd, DirProblem> {
    let root = CString::new("/").expect("no NUL");
    // SAFETY: a constant NUL-terminated path; the result is checked by `fd_result`.
    let mut fd = fd_result(unsafe { libc::open(root.as_ptr(), DIR_FLAGS) })
        .map_err(|e| DirProblem::Io(PathBuf::from("/"), e))?;
    let mut so_far = PathBuf::from("/");
    for comp in dir.components() {
        let name: &OsStr = match comp {
            Component::Normal(n) => n,
            Component::RootDir | Component::CurDir => continue,
            Component::ParentDir | Component::Prefix(_) => {
                return Err(DirProblem::Io(
                    so_far,
                    io::Error::from_raw_os_error(libc::EINVAL),
                ))
            }
        };
        so_far.push(name);
        let c = CString::new(name.as_bytes()).map_err(|_| {
            DirProblem::Io(so_far.clone(), io::Error::from_raw_os_error(libc::EINVAL))
        })?;
        // SAFETY: `fd` is an open directory and `c` a NUL-terminated name; checked below.
        let next =
            unsafe { libc::openat(fd.as_raw_fd(), c.as_ptr(), DIR_FLAGS | libc::O_NOFOLLOW) };
        match fd_result(next) {
            Ok(n) => fd = n,
            Err(e) => {
                return Err(match e.raw_os_error() {
                    Some(libc::ENOENT) => DirProblem::Missing(so_far),
                    Some(libc::ELOOP) | Some(libc::ENOTDIR) => match stat_at(&fd, &c) {
                        Ok(Some(st)) if st.st_mode & libc::S_IFMT == libc::S_IFLNK => {
                            DirProblem::Symlink(so_far)
                        }
                        _ => DirProblem::NotDir(so_far),
                    },
                    _ => DirProblem::Io(so_far, e),
                })
            }
        }
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn modes_parse_and_world_writable_is_refused() {
        assert_eq!(parse_mode("0600", "k").unwrap(), 0o600);
        assert_eq!(parse_mode("640", "k").unwrap(), 0o640);
        assert_eq!(parse_mode("0o644", "k").unwrap(), 0o644);
        for bad in ["0666", "0602", "0777", "abc", "", "01000", "0x600"] {
            let e = parse_mode(bad, "export.file_mode").unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument);
            assert!(e.to_string().contains("export.file_mode"), "{e}");
        }
        assert!(parse_mode("0666", "k")
            .unwrap_err()
            .to_string()
            .contains("world-write"));
    }

    #[test]
    fn walk_and_openat2_agree_and_name_the_link() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::fs::create_dir(real.join("sub")).unwrap();
        symlink(&real, d.path().join("link")).unwrap();
        std::fs::write(d.path().join("file"), b"x").unwrap();

        assert!(open_dir_walk(&real.join("sub")).is_ok());
        if let Some(r) = open_dir_openat2(&real.join("sub")) {
            assert!(r.is_ok());
            assert!(open_dir_openat2(&d.path().join("link/sub"))
                .unwrap()
                .is_err());
        }
        let via_link = d.path().join("link/sub");
        match open_dir_walk(&via_link) {
            Err(DirProblem::Symlink(p)) => assert_eq!(p, d.path().join("link")),
            _ => panic!("the walk must stop at the link"),
        }
        match open_dir_walk(&d.path().join("file/sub")) {
            Err(DirProblem::NotDir(p)) => assert_eq!(p, d.path().join("file")),
            _ => panic!("a file is not a directory"),
        }
        match open_dir_walk(&d.path().join("nope/sub")) {
            Err(DirProblem::Missing(p)) => assert_eq!(p, d.path().join("nope")),
            _ => panic!("missing directory"),
        }
    }

    #[test]
    fn temp_files_of_a_dead_writer_are_removed_and_nothing_else() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("out.qcow2");
        let left = Destination::open(&dest, false, "t")
            .unwrap()
            .create(0o600)
            .unwrap();
        let tmp_name = std::ffi::OsStr::from_bytes(left.tmp.as_bytes()).to_owned();
        std::mem::forget(left); // as if the process died
        assert!(d.path().join(&tmp_name).exists());
        for other in [
            ".out.qcow2.w-notanid.part",
            ".other.w-0123456789abcdef.part",
            "out.qcow2",
        ] {
            std::fs::write(d.path().join(other), b"x").unwrap();
        }
        std::os::unix::fs::symlink(
            "/etc/passwd",
            d.path().join(".out.qcow2.w-0123456789abcdef.part"),
        )
        .unwrap();
        assert_eq!(remove_temp_files(&dest).unwrap(), 1);
        assert!(!d.path().join(&tmp_name).exists());
        let mut names: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                ".other.w-0123456789abcdef.part",
                ".out.qcow2.w-0123456789abcdef.part",
                ".out.qcow2.w-notanid.part",
                "out.qcow2"
            ]
        );
    }

    #[test]
    fn create_commit_and_drop() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("out.raw");
        let nf = Destination::open(&p, false, "export path")
            .unwrap()
            .create(0o640)
            .unwrap();
        std::io::Write::write_all(&mut nf.file(), b"data").unwrap();
        nf.commit(false).unwrap();
        let md = std::fs::metadata(&p).unwrap();
        assert_eq!(md.permissions().mode() & 0o7777, 0o640);
        assert_eq!(std::fs::read(&p).unwrap(), b"data");

        // Exists: refused without overwrite, replaced with it.
        let e = Destination::open(&p, false, "export path").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AlreadyExists);
        let nf = Destination::open(&p, true, "export path")
            .unwrap()
            .create(0o600)
            .unwrap();
        std::io::Write::write_all(&mut nf.file(), b"new").unwrap();
        nf.commit(true).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");

        // Dropped uncommitted: no temp file left.
        let q = d.path().join("other.raw");
        drop(
            Destination::open(&q, false, "x")
                .unwrap()
                .create(0o600)
                .unwrap(),
        );
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);

        // Appeared between open and commit: refused, the newcomer kept.
        let nf = Destination::open(&q, false, "x")
            .unwrap()
            .create(0o600)
            .unwrap();
        std::fs::write(&q, b"keep").unwrap();
        assert_eq!(
            nf.commit(false).unwrap_err().kind(),
            ErrorKind::AlreadyExists
        );
        assert_eq!(std::fs::read(&q).unwrap(), b"keep");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 2);
    }

    #[test]
    fn containment_is_by_component() {
        let allowed = [PathBuf::from("/srv/import")];
        assert!(is_within(Path::new("/srv/import"), &allowed));
        assert!(is_within(Path::new("/srv/import/a/b.raw"), &allowed));
        assert!(!is_within(Path::new("/srv/importer/b.raw"), &allowed));
        assert!(!is_within(Path::new("/srv"), &allowed));
        assert!(!is_within(Path::new("/etc/shadow"), &allowed));
        assert!(!is_within(Path::new("/srv/import/../x"), &[]));
    }

    #[test]
    fn links_and_dotdot_cannot_lead_out() {
        let d = tempfile::tempdir().unwrap();
        let inside = d.path().join("inside");
        let out = d.path().join("out");
        std::fs::create_dir(&inside).unwrap();
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("secret"), b"s").unwrap();
        std::fs::write(inside.join("ok.raw"), b"x").unwrap();
        symlink(out.join("secret"), inside.join("link.raw")).unwrap();
        symlink(&out, inside.join("dirlink")).unwrap();
        let allowed = [std::fs::canonicalize(&inside).unwrap()];

        let ok = inside.join("ok.raw");
        precheck_within(&ok, &allowed, "import path").unwrap();
        check_opened_within(&File::open(&ok).unwrap(), &ok, &allowed, "import path").unwrap();
        // A new file in a new subdirectory is judged by where it would be.
        precheck_within(&inside.join("new/x.raw"), &allowed, "export path").unwrap();

        for p in [
            inside.join("link.raw"),
            inside.join("dirlink/secret"),
            inside.join("../out/secret"),
            PathBuf::from("/etc/shadow"),
        ] {
            let e = precheck_within(&p, &allowed, "import path").unwrap_err();
            assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{}", p.display());
            assert!(e.to_string().contains(&p.display().to_string()), "{e}");
            assert!(
                e.to_string().contains(&allowed[0].display().to_string()),
                "{e}"
            );
            // The descriptor check alone refuses it too (the string check raced, say).
            let e = check_opened_within(&File::open(&p).unwrap(), &p, &allowed, "import path")
                .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{}", p.display());
        }
        // Export: the directory is opened without links, then judged by its real path.
        let e = check_destination_within(&out.join("x.raw"), false, &allowed, "export path")
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PermissionDenied);
        let e = check_destination_within(Path::new("/etc/passwd"), true, &allowed, "export path")
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PermissionDenied);
        assert!(e.to_string().contains("/etc/passwd"), "{e}");
        check_destination_within(&inside.join("y.raw"), false, &allowed, "export path").unwrap();
        // The directory renamed away after the string check: the descriptor tells.
        let dest = Destination::open(&inside.join("z.raw"), false, "export path").unwrap();
        let moved = d.path().join("moved");
        std::fs::rename(&inside, &moved).unwrap();
        std::fs::create_dir(&inside).unwrap();
        let e = dest.check_within(&allowed).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PermissionDenied);
        assert!(e.to_string().contains("moved"), "{e}");
    }

    #[test]
    fn links_and_dotdot_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        let link = d.path().join("out.raw");
        symlink(&victim, &link).unwrap();
        for overwrite in [false, true] {
            let e = Destination::open(&link, overwrite, "export path").unwrap_err();
            assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
            assert!(e.to_string().contains("symbolic link"), "{e}");
        }
        let e = Destination::open(&d.path().join("a/../x"), false, "p").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        let e = Destination::open(Path::new("rel/x"), false, "p").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    }
}
