//! Chunk buffers aligned for direct I/O ([`ChunkBuf`]), and chunk files written around the
//! page cache (`O_DIRECT`).
//!
//! The capture pipeline reads each chunk into a [`ChunkBuf`]: 4 KiB-aligned, so the chunk file
//! is written straight from it with `O_DIRECT`. Disk files are read through the page cache:
//! read with `O_DIRECT`, a capture used a third of the CPU but, without the kernel's
//! readahead, a repeated capture (every chunk already stored: read and hash only) took 3.0 s
//! against 2.3 s for 2 GiB here, and a first capture was no faster.
//!
//! A capture writes gigabytes of chunk files that nobody reads back soon, and makes them durable
//! with one `syncfs` before the manifest. Through the page cache every byte is copied into a
//! fresh cache page and written back later by the kernel's flusher; on the virtual machines
//! imaged runs on, that costs more CPU than anything else in a capture (measured here: 2 GiB
//! as buffered writes plus `fsync`, 4.4 s wall and 3.6 s of system time; as `O_DIRECT` writes,
//! 1.0 s and 0.2 s). So a chunk file is written with `O_DIRECT` from a 4 KiB-aligned buffer:
//! the data is copied once into one of a few reused aligned buffers (a hot `memcpy`), then goes
//! straight to the device. A length that is not a multiple of 4 KiB (the last chunk of some
//! disks) has its tail written through the cache; a filesystem without `O_DIRECT` (tmpfs)
//! gets buffered writes. Durability is unchanged: `O_DIRECT` does not make a file's metadata
//! or the device's cache durable, the `syncfs` before the commit still does.
//!
//! An export writes its one file the same way ([`SequentialWriter`]); its `fsync` at the commit
//! then has little left to do. Reads of chunk files stay buffered: read through `O_DIRECT`,
//! one chunk file at a time per reader and without the kernel's readahead, an export took
//! longer (4.0–5.2 s against 3.5 s for 2 GiB here) for the CPU it saved.

use std::alloc::Layout;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;

/// The alignment `O_DIRECT` needs of buffers, offsets and lengths (the largest logical block
/// size of common devices).
const ALIGN: usize = 4096;
/// Aligned buffers kept for reuse: enough for the writers of a few captures at once.
const POOL: usize = 4;

/// A zeroed, `ALIGN`-aligned heap buffer.
struct Aligned {
    ptr: std::ptr::NonNull<u8>,
    /// The allocation's size.
    len: usize,
    /// The bytes in use (a [`ChunkBuf`]'s length).
    len_used: usize,
}

// SAFETY: `Aligned` owns its allocation exclusively (like a `Box<[u8]>`); nothing else holds
// the pointer, and shared access only reads.
unsafe impl Send for Aligned {}
// SAFETY: as above: `&Aligned` gives read-only access to owned, initialised bytes.
unsafe impl Sync for Aligned {}

impl Aligned {
    fn new(len: usize) -> Option<Aligned> {
        let layout = Layout::from_size_align(len.max(ALIGN), ALIGN).ok()?;
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        std::ptr::NonNull::new(p).map(|ptr| Aligned {
            ptr,
            len: layout.size(),
            len_used: layout.size(),
        })
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` points to `len` initialised (zeroed, then written) bytes we own
        // exclusively through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with exactly this layout (its size and alignment were
        // valid then) and freed once, here.
        unsafe {
            std::alloc::dealloc(
                self.ptr.as_ptr(),
                Layout::from_size_align_unchecked(self.len, ALIGN),
            )
        }
    }
}

/// A zeroed, 4 KiB-aligned byte buffer of fixed length: what chunks are read into, hashed
/// and stored from. Moves between threads by value, like the `Vec<u8>` it stands for.
pub struct ChunkBuf(Option<Aligned>);

impl ChunkBuf {
    /// A zeroed buffer of `len` bytes (its length is exactly `len`).
    pub fn zeroed(len: usize) -> ChunkBuf {
        if len == 0 {
            return ChunkBuf(None);
        }
        match Aligned::new(len) {
            Some(mut a) => {
                a.len_used = len;
                ChunkBuf(Some(a))
            }
            None => std::alloc::handle_alloc_error(
                Layout::from_size_align(len, ALIGN).unwrap_or(Layout::new::<u8>()),
            ),
        }
    }
}

impl Default for ChunkBuf {
    /// An empty buffer (no allocation).
    fn default() -> ChunkBuf {
        ChunkBuf(None)
    }
}

impl std::ops::Deref for ChunkBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.0 {
            // SAFETY: `ptr` points to `len` initialised bytes owned by this buffer; `len_used`
            // is at most `len`.
            Some(a) => unsafe { std::slice::from_raw_parts(a.ptr.as_ptr(), a.len_used) },
            None => &[],
        }
    }
}

impl std::ops::DerefMut for ChunkBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        match &mut self.0 {
            Some(a) => {
                let n = a.len_used;
                &mut a.as_mut_slice()[..n]
            }
            None => &mut [],
        }
    }
}

impl AsRef<[u8]> for ChunkBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl std::fmt::Debug for ChunkBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChunkBuf({} bytes)", self.len())
    }
}

static FREE: Mutex<Vec<Aligned>> = Mutex::new(Vec::new());

/// An aligned buffer of at least `len` bytes from the pool, or a new one.
fn take(len: usize) -> Option<Aligned> {
    let mut free = FREE.lock().unwrap_or_else(|p| p.into_inner());
    match free.iter().position(|b| b.len >= len) {
        Some(i) => Some(free.swap_remove(i)),
        None => {
            drop(free);
            Aligned::new(len)
        }
    }
}

fn give_back(b: Aligned) {
    let mut free = FREE.lock().unwrap_or_else(|p| p.into_inner());
    if free.len() < POOL {
        free.push(b);
    }
}

/// Creates (or truncates) the file at `path` and writes `data` into it, around the page cache
/// when the filesystem allows; mode 0644 less the umask, as `File::create`.
pub fn write_file(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let direct_len = data.len() / ALIGN * ALIGN;
    if direct_len == 0 {
        return std::fs::File::create(path)?.write_all(data);
    }
    let opened = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(path);
    let mut f = match opened {
        Ok(f) => f,
        // No O_DIRECT on this filesystem.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            return std::fs::File::create(path)?.write_all(data)
        }
        Err(e) => return Err(e),
    };
    let res = if (data.as_ptr() as usize).is_multiple_of(ALIGN) {
        // A ChunkBuf: straight from it.
        f.write_all(&data[..direct_len])
    } else {
        let Some(mut buf) = take(direct_len) else {
            return buffered(&f, data);
        };
        buf.as_mut_slice()[..direct_len].copy_from_slice(&data[..direct_len]);
        let res = f.write_all(&buf.as_mut_slice()[..direct_len]);
        give_back(buf);
        res
    };
    match res {
        Ok(()) => {}
        // The device wants a larger alignment than ours: write it all through the cache.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return buffered(&f, data),
        Err(e) => return Err(e),
    }
    if direct_len < data.len() {
        clear_direct(&f)?;
        f.write_all(&data[direct_len..])?;
    }
    Ok(())
}

/// Rewrites the whole file through the page cache.
fn buffered(f: &std::fs::File, data: &[u8]) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom};
    clear_direct(f)?;
    let mut f = f;
    f.set_len(0)?;
    f.seek(SeekFrom::Start(0))?;
    f.write_all(data)
}

/// Turns `O_DIRECT` off on an open file.
fn clear_direct(f: &std::fs::File) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    let fd = f.as_raw_fd();
    // SAFETY: `fd` is an open descriptor owned by `f` for the duration of both calls;
    // F_GETFL/F_SETFL take and return plain integers.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_DIRECT) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Writes a file front to back (an export) in 4 MiB blocks, each whole block around the page
/// cache through a second, `O_DIRECT` descriptor of the same file when the filesystem allows,
/// the last (partial) block through the file's own descriptor. Call [`SequentialWriter::finish`]
/// at the end; the caller still syncs the file.
pub struct SequentialWriter<'a> {
    file: &'a std::fs::File,
    direct: Option<std::fs::File>,
    buf: ChunkBuf,
    fill: usize,
    offset: u64,
}

impl<'a> SequentialWriter<'a> {
    /// A writer at offset 0 of `file` (open for writing).
    pub fn new(file: &'a std::fs::File) -> SequentialWriter<'a> {
        use std::os::unix::io::AsRawFd;
        let direct = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .ok();
        SequentialWriter {
            file,
            direct,
            buf: ChunkBuf::zeroed(4 << 20),
            fill: 0,
            offset: 0,
        }
    }

    fn write_block(&mut self) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let n = self.fill;
        let whole = n.is_multiple_of(ALIGN);
        let done = match (&self.direct, whole) {
            (Some(d), true) => match d.write_all_at(&self.buf[..n], self.offset) {
                Ok(()) => true,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.direct = None;
                    false
                }
                Err(e) => return Err(e),
            },
            _ => false,
        };
        if !done {
            self.file.write_all_at(&self.buf[..n], self.offset)?;
        }
        self.offset += n as u64;
        self.fill = 0;
        Ok(())
    }

    /// Writes what is buffered; the file then holds every byte written.
    pub fn finish(mut self) -> std::io::Result<()> {
        if self.fill > 0 {
            self.write_block()?;
        }
        Ok(())
    }
}

impl Write for SequentialWriter<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(self.buf.len() - self.fill);
        self.buf[self.fill..self.fill + n].copy_from_slice(&data[..n]);
        self.fill += n;
        if self.fill == self.buf.len() {
            self.write_block()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_length_is_written_whole() {
        let d = tempfile::tempdir_in("/var/tmp").unwrap();
        for len in [0usize, 1, 4095, 4096, 4097, 3 * 4096 + 17, 4 << 20] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let p = d.path().join(format!("f{len}"));
            write_file(&p, &data).unwrap();
            assert_eq!(std::fs::read(&p).unwrap(), data, "length {len}");
            // Over a longer file: truncated first.
            write_file(&p, &data[..len / 2]).unwrap();
            assert_eq!(
                std::fs::read(&p).unwrap(),
                &data[..len / 2],
                "rewrite {len}"
            );
        }
    }

    #[test]
    fn chunk_buffers_are_aligned_zeroed_and_exactly_as_long_as_asked() {
        for len in [1usize, 4096, 5000, 4 << 20] {
            let mut b = ChunkBuf::zeroed(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % ALIGN, 0);
            assert!(b.iter().all(|&x| x == 0));
            b[len - 1] = 9;
            let d = tempfile::tempdir_in("/var/tmp").unwrap();
            write_file(&d.path().join("f"), &b).unwrap();
            assert_eq!(std::fs::read(d.path().join("f")).unwrap(), &b[..]);
        }
        assert!(ChunkBuf::default().is_empty());
        assert!(ChunkBuf::zeroed(0).is_empty());
    }

    #[test]
    fn a_sequential_writer_writes_every_byte_in_order() {
        let d = tempfile::tempdir_in("/var/tmp").unwrap();
        let data: Vec<u8> = (0..(9 << 20) + 65536 + 100)
            .map(|i| (i % 253) as u8)
            .collect();
        let f = std::fs::File::create(d.path().join("f")).unwrap();
        let mut w = SequentialWriter::new(&f);
        for piece in data.chunks(1_000_003) {
            w.write_all(piece).unwrap();
        }
        w.finish().unwrap();
        assert_eq!(std::fs::read(d.path().join("f")).unwrap(), data);
    }

    #[test]
    fn tmpfs_files_are_written_whole_too() {
        // tmpfs refused O_DIRECT before Linux 6.6: either way the file is whole.
        let d = tempfile::tempdir_in("/dev/shm").unwrap();
        let data = vec![7u8; 8192 + 5];
        let p = d.path().join("f");
        write_file(&p, &data).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), data);
    }
}
