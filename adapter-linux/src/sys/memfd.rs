//! memfd: anonymous, zero-filled, shareable memory files. The back-end
//! uses a sealed one for the inflight area (GET_INFLIGHT_FD); a front-end
//! uses an unsealed one as guest RAM whose fd it sends in SET_MEM_TABLE.
//!
//! File seals also protect a back-end from its front-end: a mapping of a
//! file that shrinks under it raises SIGBUS on the next access, which
//! kills the process. [`seal_shrink`] makes sure a file can no longer
//! shrink, adding `F_SEAL_SHRINK` when the file allows it.

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

/// A memfd of `size` zero bytes (close-on-exec), without seals but
/// sealable (`MFD_ALLOW_SEALING`): guest RAM a front-end shares with
/// back-ends, which may seal it against shrinking as ours does when it
/// maps it ([`seal_shrink`]). `name` shows in `/proc/PID/fd` and
/// `/proc/PID/maps` (at most 249 bytes).
pub fn create(name: &str, size: u64) -> io::Result<OwnedFd> {
    memfd(name, size, libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
}

/// A memfd of `size` zero bytes (close-on-exec) created without
/// `MFD_ALLOW_SEALING`: its seals are `F_SEAL_SEAL` for good, so nobody
/// can ever seal it against shrinking (QEMU's `memory-backend-memfd` with
/// `seal=off` makes such files). Our back-end refuses to map one as guest
/// memory; this exists to test that.
pub fn create_unsealable(name: &str, size: u64) -> io::Result<OwnedFd> {
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

/// The seals of `fd` (`F_GET_SEALS`): a set of `F_SEAL_*` bits. Fails
/// with `EINVAL` for a file that has no seals (neither tmpfs nor
/// hugetlbfs, memfds included).
pub fn seals(fd: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    // SAFETY: F_GET_SEALS takes no argument and no pointers.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) })
}

/// Adds `seals` (`F_SEAL_*` bits) to `fd` (`F_ADD_SEALS`). Fails with
/// `EPERM` if the file is sealed with `F_SEAL_SEAL` (every memfd made
/// without `MFD_ALLOW_SEALING`, every tmpfs or hugetlbfs file that is not
/// a memfd) or `fd` is not open for writing, with `EINVAL` for a file that
/// has no seals, with `EBUSY` for `F_SEAL_WRITE` on a file mapped
/// writable.
pub fn add_seals(fd: BorrowedFd<'_>, seals: libc::c_int) -> io::Result<()> {
    // SAFETY: F_ADD_SEALS takes an int argument and no pointers; `fd` is
    // borrowed, so it stays open for the whole call.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) })?;
    Ok(())
}

/// What [`seal_shrink`] found or did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShrinkSeal {
    /// The file already had `F_SEAL_SHRINK` (QEMU's `memory-backend-memfd`
    /// by default, our inflight area).
    Sealed,
    /// The file allowed sealing and now has `F_SEAL_SHRINK`.
    SealedNow,
    /// The file cannot be sealed: a tmpfs or hugetlbfs file that is not a
    /// sealable memfd (`F_SEAL_SEAL`), a file on another file system (no
    /// seals at all), or a sealable file whose fd is read-only. Its owner
    /// can still truncate it.
    Unsealable,
}

/// Makes sure the file of `fd` can no longer shrink: adds `F_SEAL_SHRINK`
/// unless it is there or the file cannot take it ([`ShrinkSeal`]). The
/// seal is on the file, so it binds every process that shares it,
/// including the one that sent it (its writes and growth are not
/// affected; hole punching is not either).
pub fn seal_shrink(fd: BorrowedFd<'_>) -> io::Result<ShrinkSeal> {
    match seals(fd) {
        Ok(s) if s & libc::F_SEAL_SHRINK != 0 => return Ok(ShrinkSeal::Sealed),
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(ShrinkSeal::Unsealable),
        Err(e) => return Err(e),
    }
    match add_seals(fd, libc::F_SEAL_SHRINK) {
        Ok(()) => Ok(ShrinkSeal::SealedNow),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Ok(ShrinkSeal::Unsealable),
        Err(e) => Err(e),
    }
}

/// Whether `fd` is a memfd, by the name the kernel gives it
/// (`/proc/self/fd/N` reads `/memfd:NAME (deleted)`). False when `/proc`
/// is not mounted.
pub fn is_memfd(fd: BorrowedFd<'_>) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|p| p.as_os_str().as_encoded_bytes().starts_with(b"/memfd:"))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn shrink(fd: &OwnedFd) -> io::Result<()> {
        File::from(fd.try_clone()?).set_len(0)
    }

    #[test]
    fn a_sealable_memfd_is_sealed_against_shrinking_once() {
        let fd = create("t", 8192).unwrap();
        assert!(is_memfd(fd.as_fd()));
        assert_eq!(seals(fd.as_fd()).unwrap(), 0);
        assert_eq!(seal_shrink(fd.as_fd()).unwrap(), ShrinkSeal::SealedNow);
        assert_eq!(seal_shrink(fd.as_fd()).unwrap(), ShrinkSeal::Sealed);
        let e = shrink(&fd).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
        // Growing and writing stay allowed.
        File::from(fd.try_clone().unwrap()).set_len(16384).unwrap();
        let sealed = create_sealed("s", 4096).unwrap();
        assert_eq!(seal_shrink(sealed.as_fd()).unwrap(), ShrinkSeal::Sealed);
    }

    #[test]
    fn an_unsealable_memfd_and_a_plain_file_are_reported() {
        let fd = create_unsealable("t", 4096).unwrap();
        assert!(is_memfd(fd.as_fd()));
        assert_eq!(seals(fd.as_fd()).unwrap(), libc::F_SEAL_SEAL);
        assert_eq!(seal_shrink(fd.as_fd()).unwrap(), ShrinkSeal::Unsealable);
        let dir = std::env::temp_dir().join(format!("vhu-seal-{}", std::process::id()));
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&dir)
            .unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert!(!is_memfd(f.as_fd()));
        assert_eq!(seal_shrink(f.as_fd()).unwrap(), ShrinkSeal::Unsealable);
    }
}
