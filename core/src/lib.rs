//! # vhost-user-core
//!
//! The allocation-free, sans-I/O core of vhu, a vhost-user implementation.
//! It holds the wire formats ([`message`]), feature negotiation
//! ([`feature`]) and, built on them, the vring engine and the session
//! engines. It never touches a socket, a file descriptor, a clock or a
//! thread: bytes and fd counts go in, typed values and bytes written into
//! caller buffers come out. Adapters (Linux, in-memory tests, a hypervisor's
//! own channel) do the I/O.
//!
//! The crate is `no_std`, uses no allocator and no `unsafe`. No input, however
//! malformed, makes it panic: every peer-controlled value is checked and
//! refused with a typed error.
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(test)]
extern crate std;

#[macro_use]
mod fmt;

pub mod backend;
pub mod dataplane;
pub mod device;
pub mod feature;
pub mod frontend;
pub mod inflight;
pub mod log;
pub mod memory;
pub mod message;
pub mod transport;
pub mod vring;
