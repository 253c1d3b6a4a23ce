//! epoll: waits on many fds (the vhost-user socket, kick eventfds, a stop
//! eventfd) at once. Each registration carries a caller-chosen `u64` token
//! that comes back with its events.

use std::fmt;
use std::io;
use std::ops::{BitOr, BitOrAssign};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;
use std::time::{Duration, Instant};

use super::cvt;

/// The events a registration asks for (a set of `EPOLL*` bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Interest(u32);

impl Interest {
    /// Readable (`EPOLLIN`).
    pub const READABLE: Interest = Interest(libc::EPOLLIN as u32);
    /// Writable (`EPOLLOUT`).
    pub const WRITABLE: Interest = Interest(libc::EPOLLOUT as u32);
    /// Peer closed its writing end (`EPOLLRDHUP`).
    pub const READ_HANGUP: Interest = Interest(libc::EPOLLRDHUP as u32);
    /// Edge-triggered (`EPOLLET`).
    pub const EDGE: Interest = Interest(libc::EPOLLET as u32);
    /// Disabled after one event until re-armed with [`Epoll::modify`]
    /// (`EPOLLONESHOT`).
    pub const ONESHOT: Interest = Interest(libc::EPOLLONESHOT as u32);

    /// The raw `EPOLL*` bits.
    pub const fn bits(self) -> u32 {
        self.0
    }
}

impl BitOr for Interest {
    type Output = Interest;
    fn bitor(self, rhs: Interest) -> Interest {
        Interest(self.0 | rhs.0)
    }
}

impl BitOrAssign for Interest {
    fn bitor_assign(&mut self, rhs: Interest) {
        self.0 |= rhs.0;
    }
}

/// One event reported by [`Epoll::wait`].
#[derive(Clone, Copy)]
#[repr(transparent)]
pub struct EpollEvent(libc::epoll_event);

impl Default for EpollEvent {
    fn default() -> Self {
        EpollEvent(libc::epoll_event { events: 0, u64: 0 })
    }
}

impl EpollEvent {
    /// The token given when the fd was registered.
    pub fn token(&self) -> u64 {
        self.0.u64
    }

    /// The raw `EPOLL*` bits that fired.
    pub fn bits(&self) -> u32 {
        self.0.events
    }

    /// Data can be read (`EPOLLIN`).
    pub fn is_readable(&self) -> bool {
        self.bits() & libc::EPOLLIN as u32 != 0
    }

    /// Data can be written (`EPOLLOUT`).
    pub fn is_writable(&self) -> bool {
        self.bits() & libc::EPOLLOUT as u32 != 0
    }

    /// Hang-up or peer closed its writing end (`EPOLLHUP`, `EPOLLRDHUP`).
    pub fn is_hangup(&self) -> bool {
        self.bits() & (libc::EPOLLHUP | libc::EPOLLRDHUP) as u32 != 0
    }

    /// Error condition (`EPOLLERR`).
    pub fn is_error(&self) -> bool {
        self.bits() & libc::EPOLLERR as u32 != 0
    }
}

impl fmt::Debug for EpollEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Copy out of the (packed on x86_64) struct before formatting.
        let (token, bits) = (self.token(), self.bits());
        f.debug_struct("EpollEvent")
            .field("token", &token)
            .field("events", &format_args!("{bits:#x}"))
            .finish()
    }
}

/// An epoll instance (close-on-exec).
#[derive(Debug)]
pub struct Epoll {
    fd: OwnedFd,
}

impl Epoll {
    /// A new, empty epoll instance.
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: epoll_create1 takes no pointers.
        let fd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: `fd` was just returned by the kernel; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Epoll { fd })
    }

    fn ctl(
        &self,
        op: libc::c_int,
        fd: BorrowedFd<'_>,
        ev: Option<(Interest, u64)>,
    ) -> io::Result<()> {
        let mut e = libc::epoll_event { events: 0, u64: 0 };
        if let Some((interest, token)) = ev {
            e.events = interest.0;
            e.u64 = token;
        }
        // SAFETY: `e` is a valid epoll_event for the duration of the call
        // (the kernel ignores it for EPOLL_CTL_DEL); `fd` is open.
        cvt(unsafe {
            libc::epoll_ctl(
                self.fd.as_raw_fd(),
                op,
                fd.as_raw_fd(),
                ptr::addr_of_mut!(e),
            )
        })?;
        Ok(())
    }

    /// Registers `fd` for `interest`, reporting `token` with its events.
    /// The registration lasts until [`Epoll::delete`] or until every copy
    /// of the fd's file description is closed (closing one fd of a
    /// duplicated description does not remove it: delete first).
    pub fn add(&self, fd: impl AsFd, interest: Interest, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd.as_fd(), Some((interest, token)))
    }

    /// Changes the interest and token of a registered fd (also re-arms a
    /// [`Interest::ONESHOT`] registration).
    pub fn modify(&self, fd: impl AsFd, interest: Interest, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd.as_fd(), Some((interest, token)))
    }

    /// Unregisters `fd`.
    pub fn delete(&self, fd: impl AsFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd.as_fd(), None)
    }

    /// Waits for events, at most `timeout_ms` milliseconds (-1: forever,
    /// 0: do not wait), and fills the front of `events`. Returns how many
    /// were filled (0 on timeout). An `EINTR` is retried with the time
    /// that is left.
    pub fn wait(&self, events: &mut [EpollEvent], timeout_ms: i32) -> io::Result<usize> {
        let max = i32::try_from(events.len()).unwrap_or(i32::MAX);
        if max == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no room for events",
            ));
        }
        let deadline =
            (timeout_ms > 0).then(|| Instant::now() + Duration::from_millis(timeout_ms as u64));
        let mut timeout = timeout_ms;
        loop {
            // SAFETY: EpollEvent is repr(transparent) over epoll_event, and
            // `events` is writable for `max` entries during the call.
            let r = unsafe {
                libc::epoll_wait(
                    self.fd.as_raw_fd(),
                    events.as_mut_ptr().cast::<libc::epoll_event>(),
                    max,
                    timeout,
                )
            };
            match cvt(r) {
                Ok(n) => return Ok(n as usize),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    if let Some(d) = deadline {
                        let left = d.saturating_duration_since(Instant::now());
                        timeout =
                            i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// [`wait`](Self::wait) with a timeout to the nanosecond (`None`:
    /// forever): `epoll_pwait2`, or, on a kernel without it (before
    /// 5.11), `epoll_wait` with the timeout rounded up to a millisecond.
    pub fn wait_for(
        &self,
        events: &mut [EpollEvent],
        timeout: Option<Duration>,
    ) -> io::Result<usize> {
        let Some(timeout) = timeout else {
            return self.wait(events, -1);
        };
        let max = i32::try_from(events.len()).unwrap_or(i32::MAX);
        if max == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no room for events",
            ));
        }
        let deadline = Instant::now() + timeout;
        let mut left = timeout;
        loop {
            let ts = libc::timespec {
                tv_sec: libc::time_t::try_from(left.as_secs()).unwrap_or(libc::time_t::MAX),
                tv_nsec: left.subsec_nanos().into(),
            };
            // SAFETY: epoll_pwait2(epfd, events, maxevents, timeout,
            // sigmask, sigsetsize): `events` is writable for `max`
            // entries (EpollEvent is repr(transparent) over epoll_event)
            // and `ts` is a live timespec during the call; no sigmask.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_epoll_pwait2,
                    self.fd.as_raw_fd(),
                    events.as_mut_ptr().cast::<libc::epoll_event>(),
                    max,
                    ptr::from_ref(&ts),
                    ptr::null::<libc::sigset_t>(),
                    0usize,
                )
            };
            if r >= 0 {
                return Ok(r as usize);
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => left = deadline.saturating_duration_since(Instant::now()),
                Some(libc::ENOSYS) => {
                    let ms = left.as_micros().div_ceil(1000);
                    return self.wait(events, i32::try_from(ms).unwrap_or(i32::MAX));
                }
                _ => return Err(e),
            }
        }
    }
}

impl AsFd for Epoll {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Epoll {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::eventfd::EventFd;

    /// A timeout under a millisecond times out with no events; a wait
    /// with a timeout returns an event that comes meanwhile, with its
    /// token.
    #[test]
    fn wait_for_times_out_or_returns_the_event() {
        let epoll = Epoll::new().unwrap();
        let ev = std::sync::Arc::new(EventFd::new(true).unwrap());
        epoll.add(&*ev, Interest::READABLE, 7).unwrap();
        let mut events = [EpollEvent::default(); 4];
        let t0 = Instant::now();
        let n = epoll
            .wait_for(&mut events, Some(Duration::from_micros(300)))
            .unwrap();
        assert_eq!(n, 0);
        assert!(t0.elapsed() >= Duration::from_micros(300));
        let writer = std::thread::spawn({
            let ev = ev.clone();
            move || {
                std::thread::sleep(Duration::from_millis(20));
                ev.write(1).unwrap();
            }
        });
        let n = epoll
            .wait_for(&mut events, Some(Duration::from_secs(60)))
            .unwrap();
        writer.join().unwrap();
        assert_eq!(n, 1);
        assert_eq!(events[0].token(), 7);
        assert!(epoll.wait_for(&mut events, Some(Duration::ZERO)).unwrap() == 1);
        assert_eq!(
            epoll.wait_for(&mut [], None).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }
}
