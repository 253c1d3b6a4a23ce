//! memfd: anonymous, zero-filled, shareable memory files. The back-end
//! uses a sealed one for the inflight area (GET_INFLIGHT_FD); a front-end
//! uses an unsealed one as guest RAM whose fd it sends in SET_MEM_TABLE.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::cvt;

/// The seals [`create_sealed`] applies: the size can never change again and
/// no seal can be added or removed, so a peer that maps the whole file can
/// never be made to fault (SIGBUS) by a shrink.
pub const SEALS: libc::c_int = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;

fn memfd(name: &str, size: u64, flags: libc::c_uint) -> io::Result<OwnedFd> {
    let name = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "memfd name contains NUL"))?;
    // SAFETY: `name` is a NUL-terminated string that outlives the call.
    let fd = cvt(unsafe { libc::memfd_create(name.as_ptr(), flags) })?;
    // SAFETY: `fd` was just returned by the kernel; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // A new memfd is empty; growing it reads back as zeroes.
    let file = File::from(fd);
    file.set_len(size)?;
    Ok(file.into())
}

/// A memfd of `size` zero bytes (close-on-exec), without seals: guest RAM a
/// front-end shares with back-ends. `name` shows in `/proc/PID/fd` and
/// `/proc/PID/maps` (at most 249 bytes).
pub fn create(name: &str, size: u64) -> io::Result<OwnedFd> {
    memfd(name, size, libc::MFD_CLOEXEC)
}

/// A memfd of `size` zero bytes (close-on-exec) sealed with [`SEALS`]
/// (`F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL`): its size is fixed for
/// good, though its contents stay writable. For the inflight area.
pub fn create_sealed(name: &str, size: u64) -> io::Result<OwnedFd> {
    let fd = memfd(name, size, libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)?;
    // SAFETY: F_ADD_SEALS takes an int argument and no pointers.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, SEALS) })?;
    Ok(fd)
}

/// The seals of `fd` (`F_GET_SEALS`): a set of `F_SEAL_*` bits.
pub fn seals(fd: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    // SAFETY: F_GET_SEALS takes no argument and no pointers.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) })
}
