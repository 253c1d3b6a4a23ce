//! Host-side block I/O for the vhost-user-blk daemon.
//!
//! - [`BlockBackend`]: what the daemon reads from and writes to, shared by
//!   every queue thread (`&self` methods, `Send + Sync`).
//! - [`FileBackend`]: a raw image file or block device (pread/pwrite,
//!   fdatasync, fallocate for discard and write zeroes), opened in one of
//!   QEMU's cache modes ([`CacheMode`]: `none` is O_DIRECT), plus
//!   [`TempImage`], a sparse temporary image deleted on drop. Its file is
//!   also handed to [`BlkService`]'s asynchronous I/O (io_uring or a
//!   thread pool), which reads and writes guest memory directly.
//! - [`NullBackend`]: reads return zeroes, writes are dropped (`--null`
//!   benchmark mode).
//! - [`execute`]: carries out a request planned by the core's
//!   [`BlkDevice`](vhost_user_core::device::blk::BlkDevice) against a
//!   backend and guest memory, and writes the status byte.

mod exec;
mod file;
mod null;
mod service;

use std::io;
use std::os::fd::BorrowedFd;

pub use exec::{execute, Completion, MAX_CHUNK};
pub use file::{CacheMode, FileBackend, TempImage};
pub use null::NullBackend;
pub use service::{BlkService, QueueCounters, Scratch};

/// Block storage behind a virtio-blk device. Offsets and lengths are in
/// bytes; the request planner has already checked them against the
/// capacity, and implementations check again (an access beyond the
/// capacity is an `InvalidInput` error, never a file extension).
pub trait BlockBackend: Send + Sync + std::fmt::Debug {
    /// Size in bytes. The device exposes `capacity() / 512` sectors.
    fn capacity(&self) -> u64;

    /// Reads the size again (an image that was resized) and returns it;
    /// backends of a fixed size return [`capacity`](Self::capacity).
    fn refresh_capacity(&self) -> io::Result<u64> {
        Ok(self.capacity())
    }

    /// Writes, discards and write zeroes are refused.
    fn read_only(&self) -> bool;

    /// Fills `buf` from byte `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Writes `buf` at byte `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Makes every completed write stable.
    fn flush(&self) -> io::Result<()>;

    /// Hints that `[offset, offset + len)` is unused (may deallocate; doing
    /// nothing is correct).
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Makes `[offset, offset + len)` read as zeroes; `may_unmap` allows
    /// deallocating it.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()>;

    /// Capacity in 512-byte sectors (a partial last sector is not exposed).
    fn capacity_sectors(&self) -> u64 {
        self.capacity() >> 9
    }

    /// The file that reads and writes go to, for I/O straight between it
    /// and guest memory (offsets as for [`read_at`](Self::read_at));
    /// `None` (the default): requests are carried out with the methods
    /// above.
    fn io_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    /// What I/O on [`io_fd`](Self::io_fd) must be aligned to (O_DIRECT);
    /// `None` (the default) when any offset, length and buffer will do.
    fn direct_alignment(&self) -> Option<DirectAlignment> {
        None
    }
}

/// The alignment O_DIRECT I/O needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirectAlignment {
    /// File offsets and lengths: the logical block size.
    pub offset: u32,
    /// Buffer addresses and lengths in memory.
    pub memory: u32,
}

/// A boxed backend is a backend (the daemon picks one at run time).
impl<T: BlockBackend + ?Sized> BlockBackend for Box<T> {
    fn capacity(&self) -> u64 {
        (**self).capacity()
    }
    fn refresh_capacity(&self) -> io::Result<u64> {
        (**self).refresh_capacity()
    }
    fn read_only(&self) -> bool {
        (**self).read_only()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        (**self).flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        (**self).write_zeroes(offset, len, may_unmap)
    }
    fn io_fd(&self) -> Option<BorrowedFd<'_>> {
        (**self).io_fd()
    }
    fn direct_alignment(&self) -> Option<DirectAlignment> {
        (**self).direct_alignment()
    }
}

/// `[offset, offset + len)` lies within `capacity`.
pub(crate) fn check_range(capacity: u64, offset: u64, len: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("range {offset}+{len} beyond the capacity {capacity}"),
        )),
    }
}

/// The error for a modification of a read-only backend.
pub(crate) fn read_only_error() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, "read-only block device")
}
