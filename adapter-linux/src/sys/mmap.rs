//! Shared memory mappings with bounds-checked access that never forms a
//! Rust reference into the mapped bytes.
//!
//! Guest memory is shared with a guest that writes it concurrently, so a
//! `&[u8]` into it would be a data race by Rust's rules. [`MmapRegion`]
//! hands out copies only: [`MmapRegion::read`] and [`MmapRegion::write`]
//! copy through raw pointers, and the 16-bit ring indices are accessed as
//! single aligned atomic operations.

use std::fmt;
use std::fs::File;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd};
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use super::{cvt, page_size};

/// What a mapping allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// `PROT_READ`.
    Read,
    /// `PROT_READ | PROT_WRITE`.
    ReadWrite,
}

/// A refused access to a mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessError {
    /// The range is not inside the mapping.
    OutOfBounds,
    /// An atomic access at an address not aligned to its size.
    Misaligned,
    /// A write to a read-only mapping.
    ReadOnly,
}

impl fmt::Display for AccessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AccessError::OutOfBounds => "access outside the mapping",
            AccessError::Misaligned => "misaligned atomic access",
            AccessError::ReadOnly => "write to a read-only mapping",
        })
    }
}

impl std::error::Error for AccessError {}

/// A `MAP_SHARED` mapping of `len` bytes of a file from `offset` on.
///
/// The mapping itself starts at the page boundary below `offset`; offsets
/// passed to the accessors are relative to `offset`.
pub struct MmapRegion {
    /// Start of the kernel mapping (page aligned).
    base: NonNull<u8>,
    /// Length of the kernel mapping.
    map_len: usize,
    /// The first byte of the region (the mapping starts at the page
    /// boundary below it).
    data: NonNull<u8>,
    /// Length of the region.
    len: usize,
    access: Access,
}

// SAFETY: the mapping is plain shared memory owned by this value; every
// access goes through raw-pointer copies or atomics, which are sound from
// any thread (the memory is shared with other processes anyway).
unsafe impl Send for MmapRegion {}
// SAFETY: as for Send; `&MmapRegion` gives no reference into the mapping.
unsafe impl Sync for MmapRegion {}

impl fmt::Debug for MmapRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MmapRegion")
            .field("base", &self.base)
            .field("len", &self.len)
            .field("access", &self.access)
            .finish()
    }
}

/// `fstat(2)` of `fd`.
fn metadata(fd: BorrowedFd<'_>) -> io::Result<std::fs::Metadata> {
    // SAFETY: the File is never dropped (ManuallyDrop), so `fd` stays owned
    // by the caller; it is only used for fstat during this call.
    let file = ManuallyDrop::new(unsafe { File::from_raw_fd(fd.as_raw_fd()) });
    file.metadata()
}

/// Whether `fd` is of a kind [`MmapRegion::map`] can map shared: a
/// regular file (memfd, tmpfs, hugetlbfs), a block device, or a
/// character device (a DAX one; which character devices map, the kind
/// does not tell: only a mapping does). A socket, a pipe, a directory or
/// an anonymous inode (eventfd, epoll) never maps.
pub fn mappable(fd: BorrowedFd<'_>) -> io::Result<bool> {
    use std::os::unix::fs::FileTypeExt;
    let kind = metadata(fd)?.file_type();
    Ok(kind.is_file() || kind.is_block_device() || kind.is_char_device())
}

/// The size of the file behind `fd` if it is a regular file (memfd,
/// tmpfs, hugetlbfs) or a block device, `None` for other kinds (a
/// character device such as a DAX one has no size to read).
pub fn file_size(fd: BorrowedFd<'_>) -> io::Result<Option<u64>> {
    use std::os::unix::fs::FileTypeExt;
    let meta = metadata(fd)?;
    if meta.file_type().is_block_device() {
        // fstat gives a block device's size as 0: ask the device.
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 stores one u64 through the pointer, which
        // points at `size`; `fd` is open for the call.
        cvt(unsafe { libc::ioctl(fd.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) })?;
        return Ok(Some(size));
    }
    Ok(meta.file_type().is_file().then_some(meta.len()))
}

/// `_IOR(0x12, 114, size_t)`: a block device's size in bytes, as a u64
/// whatever the width of `size_t` in the request's code (the kernel's
/// uapi value; the libc crate does not carry it).
const BLKGETSIZE64: libc::c_ulong =
    0x8000_1272 | (std::mem::size_of::<usize>() as libc::c_ulong) << 16;

impl MmapRegion {
    /// Maps `len` bytes of `fd` from byte `offset`, shared. A regular file
    /// or a block device must be at least `offset + len` bytes long (a
    /// shorter one would raise SIGBUS on access); `len` must not be 0.
    pub fn map(
        fd: BorrowedFd<'_>,
        offset: u64,
        len: u64,
        access: Access,
    ) -> io::Result<MmapRegion> {
        let invalid = |m: &str| io::Error::new(io::ErrorKind::InvalidInput, m.to_string());
        if len == 0 {
            return Err(invalid("empty mapping"));
        }
        let end = offset
            .checked_add(len)
            .ok_or_else(|| invalid("offset + size overflows"))?;
        if let Some(size) = file_size(fd)? {
            if size < end {
                return Err(invalid("the file is shorter than offset + size"));
            }
        }
        let page = page_size() as u64;
        let skip = offset % page;
        let map_len = usize::try_from(
            len.checked_add(skip)
                .ok_or_else(|| invalid("size overflows"))?,
        )
        .map_err(|_| invalid("size exceeds the address space"))?;
        let file_off =
            libc::off_t::try_from(offset - skip).map_err(|_| invalid("offset too large"))?;
        let prot = match access {
            Access::Read => libc::PROT_READ,
            Access::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
        };
        // SAFETY: a fresh mapping at an address of the kernel's choice
        // (NULL hint, no MAP_FIXED) cannot alias existing Rust objects;
        // `fd` is a valid open fd for the call.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                map_len,
                prot,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                file_off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base =
            NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        // SAFETY: skip < page <= map_len, so `base + skip` is inside the
        // mapping just made.
        let data = unsafe { base.add(skip as usize) };
        Ok(MmapRegion {
            base,
            map_len,
            data,
            len: map_len - skip as usize,
            access,
        })
    }

    /// Length of the region in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: empty mappings are refused.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The region's access mode.
    pub fn access(&self) -> Access {
        self.access
    }

    /// Pointer to byte `off` of the region if `[off, off + n)` is inside.
    #[inline(always)]
    fn at(&self, off: u64, n: usize) -> Result<*mut u8, AccessError> {
        let off = usize::try_from(off).map_err(|_| AccessError::OutOfBounds)?;
        let end = off.checked_add(n).ok_or(AccessError::OutOfBounds)?;
        if end > self.len {
            return Err(AccessError::OutOfBounds);
        }
        // SAFETY: `data` is `map_len - len` bytes into the mapping and
        // off + n <= len, so the result stays inside (or one past the end
        // of) the mapping.
        Ok(unsafe { self.data.as_ptr().add(off) })
    }

    /// Hints the CPU to bring the cache line holding byte `off` closer
    /// (nothing if `off` is outside the region or the target has no
    /// prefetch instruction). Never faults.
    #[inline(always)]
    pub fn prefetch(&self, off: u64, write: bool) {
        let Ok(p) = self.at(off, 1) else { return };
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a prefetch is a hint: it never faults or changes memory,
        // and `p` is inside the live mapping anyway. PREFETCHW (the line
        // fetched for writing) executes as a no-op on x86-64 processors
        // without it.
        unsafe {
            if write && self.access == Access::ReadWrite {
                core::arch::asm!("prefetchw [{p}]", p = in(reg) p, options(nostack, preserves_flags, readonly));
            } else {
                core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast());
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (p, write);
    }

    /// Copies `dst.len()` bytes at `off` into `dst`.
    #[inline]
    pub fn read(&self, off: u64, dst: &mut [u8]) -> Result<(), AccessError> {
        let src = self.at(off, dst.len())?;
        if dst.len() <= 16 {
            copy_small(src, dst);
            return Ok(());
        }
        // SAFETY: `src..src+len` is inside the live mapping (checked by
        // `at`), `dst` is a distinct Rust buffer; the guest may write the
        // source concurrently, which yields arbitrary bytes, never UB in
        // our code because no reference to the source exists.
        unsafe { ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    /// Copies `src` to `off`.
    #[inline]
    pub fn write(&self, off: u64, src: &[u8]) -> Result<(), AccessError> {
        if self.access != Access::ReadWrite {
            return Err(AccessError::ReadOnly);
        }
        let dst = self.at(off, src.len())?;
        // SAFETY: `dst..dst+len` is inside the live, writable mapping;
        // `src` is a Rust buffer that cannot overlap it (we never hand out
        // references into the mapping).
        unsafe { ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) };
        Ok(())
    }

    /// Reads `N` bytes at `off` as one unaligned load (small fixed-size
    /// reads such as descriptors, without a `memcpy` call).
    #[inline(always)]
    pub fn read_array<const N: usize>(&self, off: u64) -> Result<[u8; N], AccessError> {
        let src = self.at(off, N)?;
        // SAFETY: `src..src+N` is inside the live mapping (checked by
        // `at`); an unaligned read of a byte array is always valid, and no
        // reference into the mapping is formed.
        Ok(unsafe { ptr::read_unaligned(src.cast::<[u8; N]>()) })
    }

    /// Writes `N` bytes at `off` as one unaligned store.
    #[inline(always)]
    pub fn write_array<const N: usize>(&self, off: u64, v: [u8; N]) -> Result<(), AccessError> {
        if self.access != Access::ReadWrite {
            return Err(AccessError::ReadOnly);
        }
        let dst = self.at(off, N)?;
        // SAFETY: `dst..dst+N` is inside the live, writable mapping;
        // unaligned stores of byte arrays are valid.
        unsafe { ptr::write_unaligned(dst.cast::<[u8; N]>(), v) };
        Ok(())
    }

    #[inline]
    fn atomic_u16(&self, off: u64) -> Result<&AtomicU16, AccessError> {
        if off % 2 != 0 {
            return Err(AccessError::Misaligned);
        }
        let p = self.at(off, 2)?;
        if (p as usize) % 2 != 0 {
            return Err(AccessError::Misaligned);
        }
        // SAFETY: `p` is 2-aligned, inside the mapping for 2 bytes, and the
        // mapping lives as long as `&self`; all our accesses to ring
        // indices are atomic, and an AtomicU16 may alias memory other
        // processes write.
        Ok(unsafe { AtomicU16::from_ptr(p.cast::<u16>()) })
    }

    /// Acquire load of the little-endian u16 at `off` (2-aligned).
    #[inline]
    pub fn load_u16_acquire(&self, off: u64) -> Result<u16, AccessError> {
        Ok(u16::from_le(self.atomic_u16(off)?.load(Ordering::Acquire)))
    }

    /// Release store of the little-endian u16 `v` at `off` (2-aligned).
    #[inline]
    pub fn store_u16_release(&self, off: u64, v: u16) -> Result<(), AccessError> {
        if self.access != Access::ReadWrite {
            return Err(AccessError::ReadOnly);
        }
        self.atomic_u16(off)?.store(v.to_le(), Ordering::Release);
        Ok(())
    }

    /// Atomic OR of `bits` into the byte at `off` (the dirty log's
    /// bitmap, which the front-end reads and clears concurrently).
    #[inline]
    pub fn fetch_or_u8(&self, off: u64, bits: u8) -> Result<(), AccessError> {
        if self.access != Access::ReadWrite {
            return Err(AccessError::ReadOnly);
        }
        let p = self.at(off, 1)?;
        // SAFETY: `p` is inside the mapping for 1 byte (any address is
        // aligned for a byte), and the mapping lives as long as `&self`;
        // every access of ours to the log is atomic, and an AtomicU8 may
        // alias memory other processes write.
        let cell = unsafe { AtomicU8::from_ptr(p) };
        cell.fetch_or(bits, Ordering::Relaxed);
        Ok(())
    }
}

impl MmapRegion {
    /// Atomically replaces the u64 at `off` (8-aligned) with `v` and
    /// returns what was there (native byte order): how a front-end reads
    /// and clears the dirty log a word at a time while the back-end sets
    /// bits in it, losing none.
    #[inline]
    pub fn swap_u64(&self, off: u64, v: u64) -> Result<u64, AccessError> {
        if self.access != Access::ReadWrite {
            return Err(AccessError::ReadOnly);
        }
        if off % 8 != 0 {
            return Err(AccessError::Misaligned);
        }
        let p = self.at(off, 8)?;
        if (p as usize) % 8 != 0 {
            return Err(AccessError::Misaligned);
        }
        // SAFETY: `p` is 8-aligned, inside the mapping for 8 bytes, and the
        // mapping lives as long as `&self`; every access of ours to the log
        // is atomic, and an AtomicU64 may alias memory other processes
        // write (with their own atomics).
        let cell = unsafe { AtomicU64::from_ptr(p.cast::<u64>()) };
        Ok(cell.swap(v, Ordering::AcqRel))
    }
}

/// A byte range of a shared mapping handed to the kernel for I/O
/// (`readv`/`writev` through io_uring or a thread pool): the address and
/// length, checked against the mapping when made, and a reference that
/// keeps the mapping alive until the I/O is over, even if the guest
/// memory table drops the region meanwhile (no unmap, so no reuse of the
/// address by a new mapping, under an operation in flight).
#[derive(Clone)]
pub struct IoBuf {
    map: Arc<MmapRegion>,
    addr: usize,
    len: usize,
    writable: bool,
}

impl fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoBuf")
            .field("addr", &(self.addr as *const u8))
            .field("len", &self.len)
            .field("writable", &self.writable)
            .finish()
    }
}

impl IoBuf {
    /// `len` bytes of `map` from byte `off`; `writable` if the I/O may
    /// store into them (a read from a file), which a read-only mapping
    /// refuses.
    pub fn new(
        map: &Arc<MmapRegion>,
        off: u64,
        len: usize,
        writable: bool,
    ) -> Result<IoBuf, AccessError> {
        if writable && map.access != Access::ReadWrite {
            return Err(AccessError::ReadOnly);
        }
        let p = map.at(off, len)?;
        Ok(IoBuf {
            map: Arc::clone(map),
            addr: p as usize,
            len,
            writable,
        })
    }

    /// The host address of the first byte.
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty range.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The I/O may store into the range.
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// The same range without its first `n` bytes (all of them if `n`
    /// is larger).
    pub fn advance(&mut self, n: usize) {
        let n = n.min(self.len);
        self.addr += n;
        self.len -= n;
    }

    /// Stores zeroes over the whole range (what a read past the end of a
    /// file leaves); refused for a buffer that is not writable.
    pub fn fill_zero(&self) -> Result<(), AccessError> {
        if !self.writable {
            return Err(AccessError::ReadOnly);
        }
        // SAFETY: `addr..addr+len` is inside the mapping `map` keeps
        // alive (checked by `new`, only shrunk by `advance`), which is
        // writable (`new` refuses a writable buffer of a read-only
        // mapping); no Rust reference into it exists.
        unsafe { ptr::write_bytes(self.addr as *mut u8, 0, self.len) };
        Ok(())
    }

    /// Whether two buffers keep the same mapping alive (tests).
    pub fn same_mapping(&self, other: &IoBuf) -> bool {
        Arc::ptr_eq(&self.map, &other.map)
    }

    /// Number of holders of the mapping (the memory table's and the
    /// buffers'), for tests of the mapping's lifetime.
    pub fn mapping_refs(&self) -> usize {
        Arc::strong_count(&self.map)
    }
}

impl Drop for MmapRegion {
    fn drop(&mut self) {
        // SAFETY: `base`/`map_len` are exactly what mmap returned, and no
        // reference into the mapping outlives `self` (atomics borrow self).
        let r = unsafe { libc::munmap(self.base.as_ptr().cast(), self.map_len) };
        let _ = cvt(r);
    }
}

/// Copies `dst.len()` (at most 16) bytes from `src` in 8-, 4-, 2- and
/// 1-byte pieces that do not overlap. A small header read this way and
/// then loaded as a word is forwarded from the stores; `memcpy`'s
/// overlapping stores (bytes 0..8 and 4..12 for 12 bytes) make that load
/// wait for them to retire.
#[inline(always)]
fn copy_small(src: *const u8, dst: &mut [u8]) {
    let mut i = 0;
    macro_rules! piece {
        ($n:literal) => {
            while dst.len() - i >= $n {
                // SAFETY: the caller checked `src..src + dst.len()` is inside
                // the live mapping and i + $n <= dst.len(); an unaligned read
                // of a byte array is valid and forms no reference into it.
                let v = unsafe { ptr::read_unaligned(src.add(i).cast::<[u8; $n]>()) };
                dst[i..i + $n].copy_from_slice(&v);
                i += $n;
            }
        };
    }
    piece!(8);
    piece!(4);
    piece!(2);
    piece!(1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// A block device given as guest memory is held to its size like a
    /// file (a mapping past its end would raise SIGBUS on access). Needs
    /// a loop device (root, `losetup`): skipped where none can be made.
    #[test]
    fn a_block_device_is_held_to_its_size() {
        let dir = std::env::temp_dir().join(format!("vhu-blkdev-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let attached = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&img)
            .output();
        let dev = match attached {
            Ok(o) if o.status.success() => String::from_utf8(o.stdout).unwrap().trim().to_string(),
            _ => {
                eprintln!("no loop device here: skipped");
                let _ = std::fs::remove_dir_all(&dir);
                return;
            }
        };
        let checked = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&dev)
            .map(|f| {
                let size = file_size(f.as_fd());
                let past = MmapRegion::map(f.as_fd(), 0, 2 << 20, Access::ReadWrite).map(drop);
                let tail = MmapRegion::map(f.as_fd(), 1 << 20, 4096, Access::Read).map(drop);
                let all = MmapRegion::map(f.as_fd(), 0, 1 << 20, Access::ReadWrite).map(drop);
                (size.unwrap(), past.is_err(), tail.is_err(), all.is_ok())
            });
        let _ = std::process::Command::new("losetup")
            .args(["-d", &dev])
            .status();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(checked.unwrap(), (Some(1 << 20), true, true, true));
    }

    #[test]
    fn honours_an_unaligned_offset_and_bounds() {
        let fd = super::super::memfd::create("t", 3 * 4096).unwrap();
        let a = MmapRegion::map(fd.as_fd(), 0, 3 * 4096, Access::ReadWrite).unwrap();
        a.write(4096 + 100, b"hello").unwrap();
        let b = MmapRegion::map(fd.as_fd(), 4096 + 96, 200, Access::Read).unwrap();
        let mut buf = [0u8; 5];
        b.read(4, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        assert_eq!(b.read(196, &mut buf), Err(AccessError::OutOfBounds));
        assert_eq!(b.read(u64::MAX, &mut buf), Err(AccessError::OutOfBounds));
        assert_eq!(b.write(0, b"x"), Err(AccessError::ReadOnly));
        assert_eq!(a.load_u16_acquire(1), Err(AccessError::Misaligned));
        assert_eq!(b.read_array::<5>(4).unwrap(), *b"hello");
        assert_eq!(b.read_array::<8>(196), Err(AccessError::OutOfBounds));
        assert_eq!(b.write_array(0, [1u8; 2]), Err(AccessError::ReadOnly));
        a.write_array(4096 + 110, *b"xy").unwrap();
        assert_eq!(b.read_array::<2>(14).unwrap(), *b"xy");
        a.store_u16_release(4096 + 104, 0xbeef).unwrap();
        assert_eq!(b.load_u16_acquire(8).unwrap(), 0xbeef);
    }

    #[test]
    fn small_reads_copy_every_byte_and_only_those() {
        let fd = super::super::memfd::create("t", 4096).unwrap();
        let a = MmapRegion::map(fd.as_fd(), 0, 4096, Access::ReadWrite).unwrap();
        let pattern: Vec<u8> = (0..=255u8).collect();
        a.write(0, &pattern).unwrap();
        for len in 0..=17usize {
            for off in [0u64, 1, 3, 7, 200] {
                let mut buf = [0xeeu8; 20];
                a.read(off, &mut buf[1..1 + len]).unwrap();
                let o = off as usize;
                assert_eq!(&buf[1..1 + len], &pattern[o..o + len], "len {len} at {off}");
                assert_eq!(buf[0], 0xee, "len {len} at {off}");
                assert!(
                    buf[1 + len..].iter().all(|&b| b == 0xee),
                    "len {len} at {off}"
                );
            }
        }
        let mut buf = [0u8; 12];
        assert_eq!(a.read(4090, &mut buf), Err(AccessError::OutOfBounds));
        a.prefetch(4095, true);
        a.prefetch(4096, false);
    }

    #[test]
    fn swap_u64_reads_and_clears_a_word_seen_by_byte_or() {
        let fd = super::super::memfd::create("t", 4096).unwrap();
        let a = MmapRegion::map(fd.as_fd(), 0, 4096, Access::ReadWrite).unwrap();
        // Bits set a byte at a time, as the back-end marks the log.
        a.fetch_or_u8(8, 0x01).unwrap();
        a.fetch_or_u8(15, 0x80).unwrap();
        assert_eq!(u64::from_le(a.swap_u64(8, 0).unwrap()), 1 | 1 << 63);
        assert_eq!(a.swap_u64(8, 0).unwrap(), 0, "cleared");
        assert_eq!(a.swap_u64(4, 0), Err(AccessError::Misaligned));
        assert_eq!(a.swap_u64(4096, 0), Err(AccessError::OutOfBounds));
        assert_eq!(a.swap_u64(4092 & !7, 0), Ok(0));
        let r = MmapRegion::map(fd.as_fd(), 0, 4096, Access::Read).unwrap();
        assert_eq!(r.swap_u64(0, 0), Err(AccessError::ReadOnly));
        // A mapping whose data starts off the page boundary: the word at
        // offset 0 is not 8-aligned in memory.
        let off = MmapRegion::map(fd.as_fd(), 4, 64, Access::ReadWrite).unwrap();
        assert_eq!(off.swap_u64(0, 0), Err(AccessError::Misaligned));
    }

    #[test]
    fn refuses_a_file_shorter_than_the_region() {
        let fd = super::super::memfd::create("t", 4096).unwrap();
        let e = MmapRegion::map(fd.as_fd(), 4096, 4096, Access::Read).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(MmapRegion::map(fd.as_fd(), u64::MAX, 2, Access::Read).is_err());
        assert!(MmapRegion::map(fd.as_fd(), 0, 0, Access::Read).is_err());
    }
}
