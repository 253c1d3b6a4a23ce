//! Thin, audited wrappers over libc. Every `unsafe` block of the adapter is
//! in this module and carries a `SAFETY:` comment.
//!
//! One file per concern:
//!
//! - [`socket`]: Unix stream sockets moving bytes and SCM_RIGHTS fds, read
//!   and written as vhost-user messages by the core's framer
//!   ([`Listener`], [`Stream`], [`StreamIo`], [`Received`]);
//! - [`eventfd`]: kick, call and err notifiers ([`EventFd`]);
//! - [`epoll`]: readiness multiplexing ([`Epoll`], [`Interest`],
//!   [`EpollEvent`]);
//! - [`memfd`]: anonymous shareable memory ([`memfd::create`],
//!   [`memfd::create_sealed`], sealing a front-end's file against
//!   shrinking with [`memfd::seal_shrink`]);
//! - [`mmap`]: shared mappings with bounds-checked, reference-free
//!   access ([`MmapRegion`]);
//! - [`file`](mod@file): space management of image files ([`file::fallocate`]);
//! - [`uring`]: file I/O straight into guest memory, through an io_uring
//!   ([`uring::Uring`]) or synchronously ([`uring::perform`]);
//! - [`tap`]: TAP network interfaces with virtio-net headers
//!   ([`tap::Tap`]);
//! - [`signal`]: blocking signals and waiting for them synchronously
//!   ([`SignalSet`], [`signal::block`], [`signal::wait`]).
//!
//! File descriptors are [`OwnedFd`](std::os::fd::OwnedFd) from the moment
//! they leave the kernel, so every error path closes them.

use std::io;

pub mod epoll;
pub mod eventfd;
pub mod file;
pub mod memfd;
pub mod mmap;
pub mod pipe;
pub mod signal;
pub mod socket;
pub mod tap;
pub mod uring;

pub use epoll::{Epoll, EpollEvent, Interest};
pub use eventfd::EventFd;
pub use mmap::{Access, AccessError, IoBuf, MmapRegion};
pub use signal::SignalSet;
pub use socket::{Listener, Received, Stream, StreamIo};

/// Turns a libc return value of `-1` into the thread's `errno` error.
fn cvt<T: Copy + PartialEq + From<i8>>(ret: T) -> io::Result<T> {
    if ret == T::from(-1) {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Calls `f` until it does not fail with `EINTR`.
fn retry<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// The system page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf only reads a configuration value; no memory is passed.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    // sysconf(_SC_PAGESIZE) cannot fail on Linux; 4 KiB is the floor anyway.
    usize::try_from(n)
        .ok()
        .filter(|n| n.is_power_of_two())
        .unwrap_or(4096)
}

/// Number of file descriptors open in this process (entries of
/// `/proc/self/fd`, minus the one used to list them). Used by leak tests.
pub fn open_fd_count() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/fd")?
        .count()
        .saturating_sub(1))
}
