//! A bare-metal binary that links the core and calls its parse and
//! negotiation functions. It has no allocator and no std: if the core needed
//! either, this would not link.
#![no_std]
#![no_main]

use core::panic::PanicInfo;

use vhost_user_core::feature::{accept_protocol, accept_virtio, ProtocolFeatures, VirtioFeatures};
use vhost_user_core::message::{Header, ParseOptions, Reply, Request, HEADER_SIZE, MAX_MESSAGE};

#[panic_handler]
fn panic(_: &PanicInfo<'_>) -> ! {
    loop {}
}

// defmt needs a global logger and timestamp when its feature is on; these
// discard everything.
#[cfg(feature = "defmt")]
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

/// The entry point a reset vector would jump to: parse a message from a
/// fixed buffer, negotiate, answer.
#[no_mangle]
pub extern "C" fn vhu_nostd_entry(input: *const u8, len: usize, out: *mut u8) -> usize {
    if input.is_null() || out.is_null() || len > MAX_MESSAGE {
        return 0;
    }
    // SAFETY: the caller passes `len` readable bytes at `input` and
    // MAX_MESSAGE writable bytes at `out`; both were checked for null.
    let (msg, out) = unsafe {
        (
            core::slice::from_raw_parts(input, len),
            core::slice::from_raw_parts_mut(out, MAX_MESSAGE),
        )
    };
    let Ok(h) = Header::parse(msg) else { return 0 };
    let Ok(req) = Request::parse(&h, &msg[HEADER_SIZE..], 0, &ParseOptions::default()) else {
        return 0;
    };
    let offered = ProtocolFeatures::MQ | ProtocolFeatures::REPLY_ACK;
    let reply = match req {
        Request::GetFeatures => Reply::U64(VirtioFeatures::VERSION_1.bits()),
        Request::SetFeatures(v) => Reply::ack(accept_virtio(VirtioFeatures::VERSION_1, v).is_ok()),
        Request::SetProtocolFeatures(v) => Reply::ack(accept_protocol(offered, v).is_ok()),
        _ => Reply::ack(false),
    };
    reply.encode(req.code(), out).unwrap_or(0)
}

#[no_mangle]
pub extern "C" fn _start() -> ! {
    let mut out = [0u8; MAX_MESSAGE];
    let msg = [1u8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];
    let n = vhu_nostd_entry(msg.as_ptr(), msg.len(), out.as_mut_ptr());
    // Keep the result observable so nothing is optimised away.
    // SAFETY: `out` is a live local array; a volatile read of its first byte
    // is in bounds.
    let _ = unsafe { core::ptr::read_volatile(&out[n.min(MAX_MESSAGE - 1)]) };
    loop {}
}
