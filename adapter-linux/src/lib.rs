//! `vhost-user-linux`: the Linux adapter of vhu.
//!
//! - [`sys`]: the only place with `unsafe` (sockets with SCM_RIGHTS,
//!   eventfd, epoll, memfd, mmap, fallocate, signal masks); the crate
//!   denies `unsafe_code` everywhere else;
//! - [`memory`]: guest memory mapped from the front-end's fds, implementing
//!   the core's `GuestMemory`;
//! - [`backend`]: the back-end runtime serving front-ends on a socket;
//! - [`aio`]: asynchronous file I/O into guest memory (io_uring or a
//!   thread pool) for devices that serve files;
//! - [`frontend`]: the front-end side, driving the core's engine.
#![warn(missing_docs)]
#![deny(unsafe_code)]

pub mod aio;
pub mod backend;
pub mod channel;
pub mod frontend;
pub mod memory;
#[allow(unsafe_code)]
pub mod sys;
