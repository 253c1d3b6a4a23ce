//! Regular files and block devices: space management beyond what
//! [`std::fs::File`] offers.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use super::{cvt, retry};

/// Sets or clears `O_NONBLOCK` on `fd`'s file description.
pub fn set_nonblocking(fd: BorrowedFd<'_>, nonblocking: bool) -> io::Result<()> {
    // SAFETY: fcntl F_GETFL / F_SETFL take no pointers; `fd` is borrowed,
    // so it stays open for both calls.
    let flags = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    let flags = if nonblocking {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags) })?;
    Ok(())
}

/// Whether `fd` was opened for reading (its access mode is not
/// `O_WRONLY`, and it is not an `O_PATH` fd): a write-only fd never polls
/// readable and fails every read; an `O_PATH` fd, whose access mode reads
/// as `O_RDONLY`, can be neither read nor polled.
pub fn readable(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: fcntl F_GETFL takes no pointer; `fd` is borrowed, so it
    // stays open for the call.
    let flags = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    Ok(flags & libc::O_ACCMODE != libc::O_WRONLY && flags & libc::O_PATH == 0)
}

/// Whether `fd` was opened for writing (its access mode is not
/// `O_RDONLY`): every write to a read-only fd fails (`EBADF`). An `O_PATH`
/// fd, which cannot be written either, reads as read-only.
pub fn writable(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: fcntl F_GETFL takes no pointer; `fd` is borrowed, so it
    // stays open for the call.
    let flags = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    Ok(flags & libc::O_ACCMODE != libc::O_RDONLY && flags & libc::O_PATH == 0)
}

/// `fallocate(2)` on `fd`: allocates, deallocates or zeroes
/// `[offset, offset + len)` as `mode` says (`0` or `libc::FALLOC_FL_*`
/// bits, e.g. `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`). Retries on
/// `EINTR`.
///
/// An `offset` or `len` that does not fit `off_t` is refused with `EINVAL`
/// before the call, as the kernel refuses such ranges. File systems and
/// devices that cannot do `mode` fail with `EOPNOTSUPP` (or `ENOSYS`,
/// `ENODEV`, `EINVAL`, depending on the kernel and file type).
pub fn fallocate(fd: BorrowedFd<'_>, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let einval = || io::Error::from_raw_os_error(libc::EINVAL);
    let offset = libc::off_t::try_from(offset).map_err(|_| einval())?;
    let len = libc::off_t::try_from(len).map_err(|_| einval())?;
    retry(|| {
        // SAFETY: fallocate takes no pointers; `fd` is borrowed, so it
        // stays open for the whole call.
        cvt(unsafe { libc::fallocate(fd.as_raw_fd(), mode, offset, len) })
    })?;
    Ok(())
}
