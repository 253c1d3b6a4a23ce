//! # vhost-user-c
//!
//! A C ABI over vhu's sans-I/O core, for C and every language that can
//! call C (Python's `ctypes`, Go's cgo, C++). The header is
//! `include/vhu.h`, generated from this crate by cbindgen and checked in.
//!
//! What the core gives Rust, this gives C:
//!
//! - the back-end session ([`backend`]): one message in, a reply and a list
//!   of actions out;
//! - the data plane of one started ring ([`dataplane`]): pop, complete by
//!   token in any order, publish with the notification decision, stop by
//!   draining or suspending, inflight recovery at start;
//! - the front-end engine ([`frontend`]): the handshake, start and stop,
//!   every reply validated, and the requests of the back-end channel
//!   served (config changes, in-band calls and ring errors, a failed ack
//!   for the rest);
//! - guest memory as a table of host pointers the caller fills, or as
//!   callbacks ([`memory`]);
//! - the virtio-blk planner ([`blk`]);
//! - the ABI's version, to check at run time ([`version`]).
//!
//! # Caller-owned state
//!
//! Nothing allocates. Every state object is opaque: the caller asks its
//! size and alignment (`vhu_backend_size()`, `vhu_backend_align()`, ...),
//! provides that much storage (stack, `static`, arena) and initialises it
//! with the matching `*_init`. A state holds no pointer to anything
//! outside itself and owns no resource, so it is dropped by forgetting
//! its storage, moved by copying its bytes, and reset by initialising it
//! again. One state object is used by one thread at a time.
//!
//! A callback of the caller's (guest memory as `vhu_mem_ops`, a
//! `vhu_device`) may call the library, but not on a state the call it
//! runs in is using: such a call returns `VHU_ERR_BUSY` and changes
//! nothing (a state's tag word marks it while a call is inside). On
//! another state, or on none, it may, by the rule for pointers below.
//!
//! # Structs that grow
//!
//! The structs a caller hands in that may grow ([`backend::vhu_device`],
//! [`memory::vhu_mem_ops`] and the configurations) begin with
//! `struct_size`, the `sizeof` of the struct in the caller's header
//! (`VHU_DEVICE_INIT` and its siblings in the header set it). The library
//! reads the fields that size covers, takes those an older size it knows
//! lacks as NULL or 0, and refuses a size it does not know with
//! `VHU_ERR_ABI` before reading past it.
//!
//! # Errors, never panics
//!
//! Every call that can fail returns a [`vhu_result`]; `vhu_result_str()`
//! names it. A NULL or misaligned pointer, storage smaller than the state,
//! storage that was not initialised as the state the call expects (each
//! state begins with a tag word), an output buffer that is too short:
//! each is an error code, never undefined behaviour of ours and never a
//! crash. The code is written not to panic (no unchecked indexing, no
//! unwrap); with the `std` feature (on by default, for hosted builds) each
//! call additionally catches a panic at the boundary and returns
//! `VHU_ERR_INTERNAL`, after which the state object involved must be
//! initialised again. So do the callbacks this crate hands to C (the blk
//! device's `vhu_device`), which answer as refused (false) then. Without `std` (bare metal) a panic would reach the
//! panic handler: the firmware's, or with the `panic-handler` feature one
//! that parks the core.
//!
//! The pointers of one call are apart, and a call checks it (comparing
//! addresses) before it forms a reference to, or writes, the bytes two of
//! them share: no buffer it reads or writes may share a byte with the
//! storage of a state it takes, no buffer it writes with another buffer
//! of the call, and no host range of a guest memory table's entry in use
//! with any of them; such a call returns `VHU_ERR_INVALID`. (The library holds a `&mut` to a state's value, or
//! a reference to a buffer, while it writes the others; a write through
//! one into another would be undefined behaviour.) The storage of the
//! blk device whose control path (`vhu_blk_device()`) a message is
//! handled with counts as a state that call takes.
//!
//! The same holds across a callback: a call made from a callback (on
//! another state, or on none) may read what the call the callback runs
//! in reads, and use the buffer the callback was handed (`dst` to write,
//! `src` or `mac` to read), but no other byte of that call's states,
//! buffers or guest memory table, and is refused with `VHU_ERR_INVALID`
//! before it writes anything. (With `std`: the library finds the calls a
//! callback runs in through thread-local storage, which a bare-metal
//! build does not have: there this stays the caller's contract.)
//!
//! What no check can catch stays the caller's contract, written in each
//! function's `# Safety`: pointers point at memory of the stated size
//! that lives for the call, the host pointers of a guest memory table map
//! what they claim, the bytes behind guest memory given as callbacks are
//! none of the call's, a state's bytes are changed by these functions
//! only, a callback returns (no `longjmp` out of it), and, without `std`,
//! a callback calls the library with none of the states or buffers of
//! the call it runs in.
#![no_std]
#![warn(missing_docs)]
// The exported names are C's: `vhu_backend`, `VHU_OK`.
#![allow(non_camel_case_types)]

#[cfg(feature = "std")]
extern crate std;

pub mod backend;
pub mod blk;
pub mod channel;
pub mod dataplane;
pub mod frontend;
pub mod log;
pub mod memory;
mod result;
mod state;
pub mod version;
mod versioned;

pub use result::{vhu_result, vhu_result_str};
pub use version::{vhu_abi_check, vhu_abi_version};

#[cfg(all(feature = "panic-handler", not(feature = "std"), not(test)))]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    // Unreachable by construction (see the crate documentation); parking
    // the core is all a firmware without an opinion can do.
    loop {
        core::hint::spin_loop();
    }
}
