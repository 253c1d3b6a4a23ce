//! [`FileBackend`]: a raw image file or block device.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use vhost_user_linux::sys::file::fallocate;

use super::{check_range, read_only_error, BlockBackend, DirectAlignment};

/// Largest buffer of zeroes written when fallocate cannot zero a range.
const ZERO_CHUNK: u64 = 1 << 20;

/// How the image is opened, as QEMU's `cache=` says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CacheMode {
    /// Through the page cache; FLUSH makes writes stable (`fdatasync`).
    #[default]
    Writeback,
    /// Through the page cache, and each write is stable when it completes
    /// (`O_DSYNC`).
    Writethrough,
    /// Around the page cache (`O_DIRECT`): offsets, lengths and buffers
    /// must be aligned to the device's logical block size; FLUSH still
    /// flushes the disk's own cache.
    None,
}

impl std::str::FromStr for CacheMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "writeback" => Ok(CacheMode::Writeback),
            "writethrough" => Ok(CacheMode::Writethrough),
            "none" | "direct" => Ok(CacheMode::None),
            _ => Err(format!(
                "unknown cache mode {s:?} (none, writeback or writethrough)"
            )),
        }
    }
}

/// A raw image file (or block device) served as a disk.
///
/// Reads and writes are positional (`pread`/`pwrite`), so one backend is
/// shared by every queue thread without locking. Flush is `fdatasync`.
/// Discard punches a hole (`FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`) and
/// does nothing where that is not supported; write zeroes punches a hole
/// when unmapping is allowed, else uses `FALLOC_FL_ZERO_RANGE`, and falls
/// back to writing zeroes.
#[derive(Debug)]
pub struct FileBackend {
    file: File,
    /// Bytes; [`BlockBackend::refresh_capacity`] reads it again.
    capacity: AtomicU64,
    read_only: bool,
    /// O_DIRECT alignment, when opened with [`CacheMode::None`].
    direct: Option<DirectAlignment>,
    /// Opened in [`CacheMode::Writeback`]: writes only copy into the page
    /// cache.
    buffered: bool,
    // Declared last: the file is closed before the image is removed.
    temp: Option<TempImage>,
}

impl FileBackend {
    /// Opens the image at `path`, read-only or read-write. The capacity is
    /// the file's (or block device's) size at open time, until
    /// [`BlockBackend::refresh_capacity`] reads it again.
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> io::Result<Self> {
        Self::open_with(path, read_only, CacheMode::Writeback)
    }

    /// Opens the image at `path` in cache mode `cache`. With
    /// [`CacheMode::None`] the logical block size of the device (the
    /// block device itself, or the one holding the file) is the alignment
    /// I/O needs; a file system that cannot do O_DIRECT is an error here.
    pub fn open_with(
        path: impl AsRef<Path>,
        read_only: bool,
        cache: CacheMode,
    ) -> io::Result<Self> {
        let path = path.as_ref();
        let flags = match cache {
            CacheMode::Writeback => 0,
            CacheMode::Writethrough => libc::O_DSYNC,
            CacheMode::None => libc::O_DIRECT,
        };
        let named = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
        let open = |flags| {
            OpenOptions::new()
                .read(true)
                .write(!read_only)
                .custom_flags(flags)
                .open(path)
        };
        // Reads do not update the image's access time (each one would
        // otherwise check whether to, a few percent of a cached read);
        // only the file's owner may ask that, others open it as is.
        let file = match open(flags | libc::O_NOATIME) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => open(flags),
            other => other,
        };
        let file = file.map_err(|e| {
            if cache == CacheMode::None && e.raw_os_error() == Some(libc::EINVAL) {
                io::Error::new(
                    e.kind(),
                    format!(
                        "{}: the file system cannot do O_DIRECT (cache=none): {e}",
                        path.display()
                    ),
                )
            } else {
                named(e)
            }
        })?;
        let mut backend = Self::from_file(file, read_only)?;
        backend.buffered = cache == CacheMode::Writeback;
        if cache == CacheMode::None {
            let lbs = logical_block_size(&backend.file).map_err(named)?;
            backend.direct = Some(DirectAlignment {
                offset: lbs,
                memory: lbs.min(512),
            });
        }
        Ok(backend)
    }

    /// The logical block size of the device behind the image: what guests
    /// should use (BLK_SIZE) and O_DIRECT I/O needs.
    pub fn logical_block_size(&self) -> u32 {
        match self.direct {
            Some(d) => d.offset,
            None => logical_block_size(&self.file).unwrap_or(512),
        }
    }

    /// Serves an already open file; `read_only` must be true unless it was
    /// opened for writing.
    pub fn from_file(mut file: File, read_only: bool) -> io::Result<Self> {
        // Seeking to the end sizes regular files and block devices alike;
        // all I/O is positional, so the file position does not matter.
        let capacity = file.seek(SeekFrom::End(0))?;
        Ok(FileBackend {
            file,
            capacity: AtomicU64::new(capacity),
            read_only,
            direct: None,
            buffered: true,
            temp: None,
        })
    }

    /// A read-write backend over a new sparse temporary image of `size`
    /// bytes, deleted when the backend is dropped.
    pub fn temp(size: u64) -> io::Result<Self> {
        let image = TempImage::new(size)?;
        let mut backend = image.open(false)?;
        backend.temp = Some(image);
        Ok(backend)
    }

    /// The temporary image's path, for a backend made by
    /// [`FileBackend::temp`].
    pub fn temp_path(&self) -> Option<&Path> {
        self.temp.as_ref().map(TempImage::path)
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn check_write(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(read_only_error());
        }
        check_range(self.capacity(), offset, len)
    }

    /// Writes zeroes over the range, in chunks of at most 1 MiB (from an
    /// aligned buffer with O_DIRECT).
    fn fill_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut zeroes = Aligned::new(len.min(ZERO_CHUNK) as usize, self.memory_alignment());
        let zeroes = zeroes.bytes();
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64) as usize;
            self.file.write_all_at(&zeroes[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// The alignment O_DIRECT needs of a buffer's address (1 without
    /// O_DIRECT).
    fn memory_alignment(&self) -> usize {
        self.direct.map_or(1, |d| d.memory.max(1) as usize)
    }

    /// Whether `buf` must go through an aligned copy: the kernel refuses
    /// an O_DIRECT transfer from or into a buffer whose address is not
    /// aligned (EINVAL; offsets and lengths are the planner's, multiples
    /// of the logical block size). The engines' requests are checked (and
    /// bounced where they are not) as they are planned; this is for the
    /// synchronous path (`--aio sync`, or no engine at all), whose buffer
    /// is a plain allocation.
    fn unaligned(&self, buf: &[u8]) -> bool {
        buf.as_ptr() as usize % self.memory_alignment() != 0
    }
}

/// A zeroed buffer of `len` bytes whose address is aligned to `align` (a
/// power of two).
struct Aligned {
    bytes: Vec<u8>,
    at: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize, align: usize) -> Aligned {
        let bytes = vec![0u8; len + align - 1];
        let at = (align - bytes.as_ptr() as usize % align) % align;
        Aligned { bytes, at, len }
    }

    fn bytes(&mut self) -> &mut [u8] {
        &mut self.bytes[self.at..self.at + self.len]
    }
}

impl BlockBackend for FileBackend {
    fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Acquire)
    }

    /// The file's (or block device's) size now: an image that grew (or
    /// shrank) is served at its new size from the next request on.
    fn refresh_capacity(&self) -> io::Result<u64> {
        let size = (&self.file).seek(SeekFrom::End(0))?;
        self.capacity.store(size, Ordering::Release);
        Ok(size)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.capacity(), offset, buf.len() as u64)?;
        if self.unaligned(buf) {
            let mut a = Aligned::new(buf.len(), self.memory_alignment());
            self.file.read_exact_at(a.bytes(), offset)?;
            buf.copy_from_slice(a.bytes());
            return Ok(());
        }
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_write(offset, buf.len() as u64)?;
        if self.unaligned(buf) {
            let mut a = Aligned::new(buf.len(), self.memory_alignment());
            a.bytes().copy_from_slice(buf);
            return self.file.write_all_at(a.bytes(), offset);
        }
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn io_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.file.as_fd())
    }

    fn direct_alignment(&self) -> Option<DirectAlignment> {
        self.direct
    }

    fn buffered_writes(&self) -> bool {
        self.buffered
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_write(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        match fallocate(self.file.as_fd(), PUNCH_HOLE, offset, len) {
            Err(e) if unsupported(&e) => Ok(()),
            r => r,
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        self.check_write(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if may_unmap {
            match fallocate(self.file.as_fd(), PUNCH_HOLE, offset, len) {
                Err(e) if unsupported(&e) => {}
                r => return r,
            }
        }
        match fallocate(self.file.as_fd(), ZERO_RANGE, offset, len) {
            Err(e) if unsupported(&e) => self.fill_zeroes(offset, len),
            r => r,
        }
    }
}

/// The logical block size of a block device, or of the device holding a
/// file, from sysfs (`queue/logical_block_size`; a partition's is its
/// disk's). 512 where sysfs does not say (a file system without a block
/// device, such as tmpfs).
fn logical_block_size(file: &File) -> io::Result<u32> {
    let meta = file.metadata()?;
    let dev = if meta.file_type().is_block_device() {
        meta.rdev()
    } else {
        meta.dev()
    };
    let base = PathBuf::from(format!(
        "/sys/dev/block/{}:{}",
        libc::major(dev),
        libc::minor(dev)
    ));
    for q in [base.join("queue"), base.join("../queue")] {
        if let Ok(s) = std::fs::read_to_string(q.join("logical_block_size")) {
            if let Ok(n) = s.trim().parse::<u32>() {
                if n.is_power_of_two() && (512..=65536).contains(&n) {
                    return Ok(n);
                }
            }
        }
    }
    Ok(512)
}

pub(crate) const PUNCH_HOLE: libc::c_int = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
pub(crate) const ZERO_RANGE: libc::c_int = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

/// The file system or device cannot do this fallocate mode (or the range
/// does not fit `off_t`): use the next method.
pub(crate) fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL | libc::ENODEV)
    )
}

/// A sparse temporary image file, removed when dropped.
#[derive(Debug)]
pub struct TempImage {
    path: PathBuf,
}

impl TempImage {
    /// Creates a new sparse image of `size` bytes in the temporary
    /// directory.
    pub fn new(size: u64) -> io::Result<Self> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir();
        loop {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = dir.join(format!("vhu-blk-{}-{n}-{nanos}.img", std::process::id()));
            match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(file) => {
                    let image = TempImage { path };
                    file.set_len(size)?;
                    return Ok(image);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the image as a backend (which does not own the image).
    pub fn open(&self, read_only: bool) -> io::Result<FileBackend> {
        FileBackend::open(&self.path, read_only)
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    const MIB: u64 = 1 << 20;

    fn read(b: &FileBackend, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0xAA; len];
        b.read_at(&mut buf, offset).unwrap();
        buf
    }

    #[test]
    fn temp_image_is_sparse_and_removed_on_drop() {
        let b = FileBackend::temp(64 * MIB).unwrap();
        let path = b.temp_path().unwrap().to_path_buf();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 64 * MIB);
        assert!(meta.blocks() * 512 < MIB, "{} blocks", meta.blocks());
        assert_eq!(b.capacity(), 64 * MIB);
        assert_eq!(b.capacity_sectors(), 128 * 1024);
        assert!(!b.read_only());
        assert_eq!(read(&b, 0, 4096), vec![0; 4096]);
        drop(b);
        assert!(!path.exists());

        let image = TempImage::new(4096).unwrap();
        let other = TempImage::new(4096).unwrap();
        assert_ne!(image.path(), other.path());
        let path = image.path().to_path_buf();
        let b = image.open(false).unwrap();
        drop(image);
        assert!(!path.exists());
        // The open file outlives the name.
        b.write_at(&[1; 512], 0).unwrap();
        assert_eq!(read(&b, 0, 512), vec![1; 512]);
    }

    /// The image's owner opens it with O_NOATIME: a read leaves its
    /// access time alone (with relatime, an access time older than the
    /// modification time would be updated).
    #[test]
    fn reads_leave_the_access_time_alone() {
        let image = TempImage::new(MIB).unwrap();
        let f = File::options().write(true).open(image.path()).unwrap();
        let old = SystemTime::now() - std::time::Duration::from_secs(3600);
        f.set_times(std::fs::FileTimes::new().set_accessed(old))
            .unwrap();
        let atime = || std::fs::metadata(image.path()).unwrap().atime();
        let before = atime();
        for cache in [CacheMode::Writeback, CacheMode::Writethrough] {
            let b = FileBackend::open_with(image.path(), false, cache).unwrap();
            assert_eq!(read(&b, 0, 4096), vec![0; 4096]);
        }
        let b = FileBackend::open(image.path(), true).unwrap();
        assert_eq!(read(&b, 8192, 4096), vec![0; 4096]);
        assert_eq!(atime(), before);
    }

    #[test]
    fn read_write_round_trip_and_bounds() {
        let b = FileBackend::temp(MIB).unwrap();
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
        b.write_at(&data, 4096).unwrap();
        b.flush().unwrap();
        assert_eq!(read(&b, 4096, 8192), data);
        // Through a second, independent open of the same file.
        let again = FileBackend::open(b.temp_path().unwrap(), true).unwrap();
        assert_eq!(read(&again, 4096 + 512, 512), data[512..1024]);
        // The last byte is reachable, one more is not; the file never grows.
        b.write_at(&[9], MIB - 1).unwrap();
        let e = b.write_at(&[9; 2], MIB - 1).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let e = b.read_at(&mut [0; 512], MIB).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(b.write_at(&[0], u64::MAX).is_err());
        assert_eq!(b.file().metadata().unwrap().len(), MIB);
    }

    #[test]
    fn read_only_open_refuses_modifications() {
        let image = TempImage::new(MIB).unwrap();
        {
            let rw = image.open(false).unwrap();
            rw.write_at(&[5; 512], 0).unwrap();
        }
        let ro = image.open(true).unwrap();
        assert!(ro.read_only());
        assert_eq!(read(&ro, 0, 512), vec![5; 512]);
        for e in [
            ro.write_at(&[0; 512], 0).unwrap_err(),
            ro.discard(0, 512).unwrap_err(),
            ro.write_zeroes(0, 512, true).unwrap_err(),
        ] {
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        }
        ro.flush().unwrap();
        assert_eq!(read(&ro, 0, 512), vec![5; 512]);
    }

    #[test]
    fn open_missing_file_names_it() {
        let e = FileBackend::open("/nonexistent/vhu-blk.img", true).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("/nonexistent/vhu-blk.img"));
    }

    /// With O_DIRECT, a buffer at any address is read into and written
    /// from (through an aligned copy where the kernel would refuse it),
    /// and zeroes are written from an aligned buffer.
    #[test]
    fn o_direct_takes_buffers_at_any_address() {
        let image = TempImage::new(MIB).unwrap();
        let b = FileBackend::open_with(image.path(), false, CacheMode::None).unwrap();
        let lbs = b.logical_block_size() as usize;
        let at_file = lbs.max(4096) as u64;
        // Pages crossed by a buffer whose address is not aligned (what a
        // plain allocation may give): the kernel refuses that one
        // (EINVAL), where one inside a page may pass.
        let data: Vec<u8> = (0..2 * lbs.max(4096) as u32)
            .map(|i| (i * 13 + 1) as u8)
            .collect();
        let mut backing = vec![0u8; data.len() + 4096 + 1];
        let at = (4096 - backing.as_ptr() as usize % 4096) % 4096 + 1;
        let buf = at..at + data.len();
        backing[buf.clone()].copy_from_slice(&data);
        b.write_at(&backing[buf.clone()], at_file).unwrap();
        backing[buf.clone()].fill(0);
        b.read_at(&mut backing[buf.clone()], at_file).unwrap();
        assert_eq!(backing[buf], data[..]);
        // Through a second, buffered, open: the data reached the file.
        let again = FileBackend::open(image.path(), true).unwrap();
        assert_eq!(read(&again, at_file, data.len()), data);
        b.fill_zeroes(at_file, lbs as u64).unwrap();
        assert_eq!(read(&again, at_file, lbs), vec![0; lbs]);
        assert_eq!(read(&again, at_file + lbs as u64, lbs), data[lbs..2 * lbs]);
    }

    #[test]
    fn write_zeroes_zeroes_with_and_without_unmap() {
        let b = FileBackend::temp(4 * MIB).unwrap();
        b.write_at(&vec![0xff; 3 * MIB as usize], 0).unwrap();
        b.write_zeroes(4096, 8192, false).unwrap();
        b.write_zeroes(MIB, MIB, true).unwrap();
        assert_eq!(read(&b, 0, 4096), vec![0xff; 4096]);
        assert_eq!(read(&b, 4096, 8192), vec![0; 8192]);
        assert_eq!(read(&b, 12288, 512), vec![0xff; 512]);
        assert_eq!(read(&b, MIB, MIB as usize), vec![0; MIB as usize]);
        assert_eq!(read(&b, 2 * MIB, 512), vec![0xff; 512]);
        assert_eq!(b.file().metadata().unwrap().len(), 4 * MIB, "size kept");
        b.write_zeroes(0, 0, true).unwrap();
        let e = b.write_zeroes(4 * MIB - 512, 1024, false).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn discard_keeps_size_and_deallocates_where_supported() {
        let b = FileBackend::temp(4 * MIB).unwrap();
        b.write_at(&vec![0xff; 4 * MIB as usize], 0).unwrap();
        b.flush().unwrap();
        let before = b.file().metadata().unwrap().blocks();
        b.discard(MIB, 2 * MIB).unwrap();
        b.discard(0, 0).unwrap();
        assert_eq!(b.file().metadata().unwrap().len(), 4 * MIB);
        assert_eq!(read(&b, 0, 512), vec![0xff; 512]);
        assert_eq!(read(&b, 3 * MIB, 512), vec![0xff; 512]);
        let after = b.file().metadata().unwrap().blocks();
        // Punching holes is advisory; where it worked the range reads as
        // zeroes and the image shrank.
        if after < before {
            assert_eq!(read(&b, MIB, 4096), vec![0; 4096]);
        }
        assert!(b.discard(4 * MIB, 512).is_err());
    }

    #[test]
    fn zero_fill_fallback_writes_zeroes() {
        let b = FileBackend::temp(4 * MIB).unwrap();
        b.write_at(&vec![0xff; 4 * MIB as usize], 0).unwrap();
        // Larger than one chunk, unaligned end.
        b.fill_zeroes(512, 2 * MIB + 1024).unwrap();
        assert_eq!(read(&b, 0, 512), vec![0xff; 512]);
        assert_eq!(
            read(&b, 512, (2 * MIB + 1024) as usize),
            vec![0; (2 * MIB + 1024) as usize]
        );
        assert_eq!(read(&b, 2 * MIB + 1536, 512), vec![0xff; 512]);
    }

    #[test]
    fn fallocate_errors_are_classified() {
        let b = FileBackend::temp(MIB).unwrap();
        // An offset beyond off_t is refused before the syscall, as EINVAL,
        // which the callers treat as "unsupported".
        let e = fallocate(b.file().as_fd(), ZERO_RANGE, u64::MAX, 1).unwrap_err();
        assert!(unsupported(&e));
        assert!(!unsupported(&io::Error::from_raw_os_error(libc::EIO)));
        assert!(unsupported(&io::Error::from_raw_os_error(libc::EOPNOTSUPP)));
    }
}
