//! A bare-metal vhost-user-blk back-end: the whole of
//! `vhost-user-nostd-blk` (session, two rings with inflight tracking, split
//! and packed, the virtio-blk planner over a RAM disk) over static shared
//! memory and a mailbox channel, in a binary without allocator and std.
//! If the core needed either, this would not link.
//!
//! The front-end is on the other side of the statics (another core or VM
//! sharing them): it writes messages into `TO_BACKEND`, reads replies from
//! `TO_FRONTEND`, and lays out its rings and buffers in `RAM`. Nothing is
//! known at build time, so nothing can be optimised away: features
//! negotiated at run time choose split or packed rings.
//!
//! No `unsafe` but for naming the entry symbol and the defmt logger stub:
//! the shared statics are atomics.
#![no_std]
#![no_main]
#![deny(unsafe_code)]

use core::panic::PanicInfo;
use core::sync::atomic::AtomicU32;

use vhost_user_core::transport::NoFds;
use vhost_user_nostd_blk::mailbox::{Mailbox, Port};
use vhost_user_nostd_blk::{inflight_words, Backend, MAX_QUEUE_SIZE, QUEUES};

/// Guest RAM shared with the front-end: rings and buffers.
const RAM_BYTES: usize = 8 * 1024;
/// The RAM disk: 8 sectors.
const DISK_BYTES: usize = 4 * 1024;
/// Each direction of the channel: two largest messages.
const MAILBOX_BYTES: usize = 8 * 1024;

static RAM: [AtomicU32; RAM_BYTES / 4] = [const { AtomicU32::new(0) }; RAM_BYTES / 4];
static DISK: [AtomicU32; DISK_BYTES / 4] = [const { AtomicU32::new(0) }; DISK_BYTES / 4];
/// The inflight area's window: exactly an area for our rings.
static INFLIGHT: [AtomicU32; inflight_words(QUEUES, MAX_QUEUE_SIZE)] =
    [const { AtomicU32::new(0) }; inflight_words(QUEUES, MAX_QUEUE_SIZE)];
static TO_BACKEND: Mailbox<MAILBOX_BYTES> = Mailbox::new();
static TO_FRONTEND: Mailbox<MAILBOX_BYTES> = Mailbox::new();
/// The back-end channel (SET_BACKEND_REQ_FD): in-band calls and errors
/// (with the `inband` feature).
#[cfg(feature = "inband")]
static BACK_TO_FRONTEND: Mailbox<MAILBOX_BYTES> = Mailbox::new();
#[cfg(feature = "inband")]
static BACK_TO_BACKEND: Mailbox<MAILBOX_BYTES> = Mailbox::new();

#[panic_handler]
fn panic(_: &PanicInfo<'_>) -> ! {
    loop {}
}

// defmt needs a global logger and timestamp when its feature is on; these
// discard everything.
#[cfg(feature = "defmt")]
#[allow(unsafe_code)]
mod log {
    #[defmt::global_logger]
    struct Discard;
    // SAFETY: the logger does nothing, so it has no state to protect.
    unsafe impl defmt::Logger for Discard {
        fn acquire() {}
        unsafe fn flush() {}
        unsafe fn release() {}
        unsafe fn write(_: &[u8]) {}
    }
    defmt::timestamp!("{=u32}", 0);
}

/// The entry point a reset vector would jump to: serve front-ends for
/// ever.
// SAFETY: `_start` is the one symbol of that name: the entry point.
#[allow(unsafe_code)]
#[no_mangle]
pub extern "C" fn _start() -> ! {
    let mut chan = NoFds(Port::new(&TO_BACKEND, &TO_FRONTEND));
    #[cfg(feature = "inband")]
    let mut back = NoFds(Port::new(&BACK_TO_BACKEND, &BACK_TO_FRONTEND));
    let Ok(mut backend) = Backend::new(&RAM, &DISK, &INFLIGHT) else {
        loop {
            core::hint::spin_loop();
        }
    };
    loop {
        let ok = backend.poll(&mut chan).is_ok();
        #[cfg(feature = "inband")]
        let ok = ok && backend.poll_backend(&mut back).is_ok();
        if !ok {
            // The conversation broke: what is left of it is dropped, and
            // the back-end waits for a new one.
            chan.0.discard();
            #[cfg(feature = "inband")]
            back.0.discard();
        }
    }
}
