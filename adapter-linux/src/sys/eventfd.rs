//! eventfd: the kick, call and err notifiers of vhost-user rings.
//!
//! Kick and call fds usually come from the front-end (SET_VRING_KICK /
//! SET_VRING_CALL) and are wrapped with [`EventFd::from`]. Their
//! `O_NONBLOCK` flag belongs to the file description the front-end shares
//! with us (QEMU creates its notifiers non-blocking), so do not assume a
//! received eventfd blocks in [`EventFd::read`]: use [`EventFd::wait`] to
//! sleep until it is signalled, whatever the flag.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;
use std::time::{Duration, Instant};

use super::{cvt, retry};

/// An eventfd counter.
#[derive(Debug)]
pub struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    /// A new eventfd with counter 0 (close-on-exec; `EFD_NONBLOCK` if
    /// `nonblocking`).
    pub fn new(nonblocking: bool) -> io::Result<EventFd> {
        let mut flags = libc::EFD_CLOEXEC;
        if nonblocking {
            flags |= libc::EFD_NONBLOCK;
        }
        // SAFETY: eventfd takes no pointers.
        let fd = cvt(unsafe { libc::eventfd(0, flags) })?;
        // SAFETY: `fd` was just returned by the kernel; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(EventFd { fd })
    }

    /// Adds `n` to the counter (signals the fd). `n` must not be
    /// `u64::MAX`. On a non-blocking fd whose counter would overflow this is
    /// a [`io::ErrorKind::WouldBlock`] error. Retries on `EINTR`.
    pub fn write(&self, n: u64) -> io::Result<()> {
        let bytes = n.to_ne_bytes();
        retry(|| {
            // SAFETY: `bytes` is readable for 8 bytes during the call.
            let r = cvt(unsafe {
                libc::write(self.fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len())
            })?;
            if r as usize == bytes.len() {
                Ok(())
            } else {
                Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "short eventfd write",
                ))
            }
        })
    }

    /// Reads and resets the counter. Blocks while it is 0 if the fd is
    /// blocking; on a non-blocking fd returns [`io::ErrorKind::WouldBlock`]
    /// then. Retries on `EINTR`.
    pub fn read(&self) -> io::Result<u64> {
        Self::read_fd(self.fd.as_fd())
    }

    /// [`EventFd::read`] of an eventfd owned elsewhere (a device's
    /// completion notifier).
    pub fn read_fd(fd: BorrowedFd<'_>) -> io::Result<u64> {
        let mut bytes = [0u8; 8];
        retry(|| {
            // SAFETY: `bytes` is writable for 8 bytes during the call; `fd`
            // is borrowed, so it stays open.
            let r =
                cvt(unsafe { libc::read(fd.as_raw_fd(), bytes.as_mut_ptr().cast(), bytes.len()) })?;
            if r as usize == bytes.len() {
                Ok(())
            } else {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "short eventfd read",
                ))
            }
        })?;
        Ok(u64::from_ne_bytes(bytes))
    }

    /// Waits until the counter is non-zero, at most `timeout` (`None`:
    /// forever), then reads and resets it. Returns `Ok(None)` on timeout.
    /// Works whether the fd is blocking or not (it polls, then reads).
    /// Meant for a single reader: if another thread reads the same fd
    /// between the poll and the read, a blocking fd blocks until the next
    /// signal and a non-blocking one goes back to waiting. Retries on
    /// `EINTR`.
    pub fn wait(&self, timeout: Option<Duration>) -> io::Result<Option<u64>> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let ms = match deadline {
                None => -1,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    // Round up so a short timeout still sleeps.
                    i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
                }
            };
            if !poll_readable(self.fd.as_fd(), ms)? {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Ok(None);
                }
                continue;
            }
            match self.read() {
                Ok(v) => return Ok(Some(v)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Takes a pending kick off a notifier the front-end gave, whatever
    /// kind of fd it turns out to be: `Ok(true)` if something was read
    /// (an eventfd's counter, or up to 8 bytes of a pipe or socket),
    /// `Ok(false)` if nothing is pending. Reads only when the fd polls
    /// readable, so a blocking fd does not block. End of file (a pipe or
    /// socket whose other end is closed) and any read error are errors:
    /// such an fd never carries a kick again, and stays readable for
    /// good, so whoever waits on it must stop.
    pub fn take_kick(&self) -> io::Result<bool> {
        if !self.is_signalled()? {
            return Ok(false);
        }
        let mut bytes = [0u8; 8];
        let read = retry(|| {
            // SAFETY: `bytes` is writable for 8 bytes during the call; the
            // fd is ours and open.
            cvt(unsafe { libc::read(self.fd.as_raw_fd(), bytes.as_mut_ptr().cast(), bytes.len()) })
        });
        match read {
            Ok(0) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "end of file: not an eventfd, and its writer is gone",
            )),
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// True if the counter is non-zero now (a zero-timeout poll; the count
    /// is left as it is).
    pub fn is_signalled(&self) -> io::Result<bool> {
        poll_readable(self.fd.as_fd(), 0)
    }
}

/// Polls one fd for readability for up to `timeout_ms` (-1: forever).
/// `EINTR` counts as "not readable yet".
pub(crate) fn poll_readable(fd: BorrowedFd<'_>, timeout_ms: i32) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `p` is one valid pollfd, writable during the call.
    match cvt(unsafe { libc::poll(ptr::addr_of_mut!(p), 1, timeout_ms) }) {
        Ok(n) => Ok(n > 0
            && p.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(false),
        Err(e) => Err(e),
    }
}

impl From<OwnedFd> for EventFd {
    /// Wraps an eventfd received from a peer. Nothing is checked here: a
    /// wrong kind of fd makes [`EventFd::read`] / [`EventFd::write`] fail.
    fn from(fd: OwnedFd) -> EventFd {
        EventFd { fd }
    }
}

impl From<EventFd> for OwnedFd {
    fn from(e: EventFd) -> OwnedFd {
        e.fd
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
