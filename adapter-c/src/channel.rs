//! The back-end's end of the back-end channel (the socket the front-end
//! hands over with SET_BACKEND_REQ_FD, `VHU_ACTION_SET_BACKEND_CHANNEL`):
//! the requests a back-end sends encoded into the caller's buffer, and the
//! front-end's acks checked. A [`vhu_channel`] is made from a session
//! ([`vhu_backend_channel`]) once the channel's fd came, and holds what
//! was negotiated and the request whose ack is awaited.
//!
//! - CONFIG_CHANGE_MSG ([`vhu_channel_config_change`], with CONFIG): the
//!   device's config space changed (a disk resized); the front-end reads
//!   it again and tells the guest.
//! - BACKEND_VRING_CALL and BACKEND_VRING_ERR ([`vhu_channel_vring_call`],
//!   [`vhu_channel_vring_err`], with INBAND_NOTIFICATIONS): a ring's call
//!   or error, in-band, for a ring whose front-end gave no eventfd
//!   (`VHU_ACTION_SET_CALL`/`_SET_ERR` with `fd` -1 and `flag` true).
//!
//! With REPLY_ACK negotiated (always, for in-band notifications) every
//! request asks for an ack: read the front-end's reply from the channel
//! and hand it to [`vhu_channel_reply`] before sending another; a
//! front-end that never answers is given up ([`vhu_channel_abandon`]) and
//! the connection ended.

use vhost_user_core::backend::{Channel, ChannelError, Sent};
use vhost_user_core::message::WireError;

use crate::backend::{vhu_backend, whole_message, Backend};
use crate::result::guard;
use crate::result::vhu_result::{self, *};
use crate::state::{self, Footprint, Kind};

/// A back-end channel (opaque; `vhu_channel_size()` bytes aligned to
/// `vhu_channel_align()`, made by `vhu_backend_channel()`).
#[derive(Debug)]
pub struct vhu_channel {
    _opaque: [u8; 0],
}

impl Kind for Channel {
    const TAG: u32 = 0x7668_7543;
}

/// Bytes of a channel's storage.
#[no_mangle]
pub extern "C" fn vhu_channel_size() -> usize {
    state::size::<Channel>()
}

/// Alignment of a channel's storage.
#[no_mangle]
pub extern "C" fn vhu_channel_align() -> usize {
    state::align::<Channel>()
}

fn channel_error(e: ChannelError) -> vhu_result {
    #[allow(unreachable_patterns)]
    match e {
        ChannelError::NotNegotiated(_) => VHU_ERR_NOT_NEGOTIATED,
        ChannelError::Busy => VHU_ERR_BUSY,
        ChannelError::Wire(WireError::BufferTooSmall { .. }) => VHU_ERR_SHORT_BUFFER,
        ChannelError::Wire(_) => VHU_ERR_WIRE,
        ChannelError::Failed(_) => VHU_ERR_NACK,
        _ => VHU_ERR_PROTOCOL,
    }
}

/// Makes the back-end channel of session `be` in `storage` (`size`
/// bytes), for what the session negotiated: once
/// `VHU_ACTION_SET_BACKEND_CHANNEL` gave its fd. `VHU_ERR_STATE` if the
/// session has no channel (BACKEND_REQ not negotiated, or no fd yet).
/// Make it again after a new SET_BACKEND_REQ_FD.
///
/// # Safety
///
/// `be` points at an initialised back-end; `storage` at `size` writable
/// bytes.
#[no_mangle]
pub unsafe extern "C" fn vhu_backend_channel(
    be: *mut vhu_backend,
    storage: *mut vhu_channel,
    size: usize,
) -> vhu_result {
    guard(|| {
        state::storage::<Channel, _>(storage, size, vhu_channel_size())?;
        let mut fp = Footprint::new();
        // SAFETY: the caller's contract.
        unsafe { fp.state::<Backend, _>(be) }?;
        fp.writes(storage.cast::<u8>(), vhu_channel_size())?;
        // SAFETY: the caller's contract.
        let b = unsafe { state::get::<Backend, _>(be) }?;
        let ch = b.session.channel().ok_or(VHU_ERR_STATE)?;
        drop(b);
        // SAFETY: `storage` was checked; the caller's contract makes it
        // writable.
        unsafe { state::init(storage, size, vhu_channel_size(), ch) }
    })
}

/// Encodes a request with `encode` into `buf` (`cap` bytes): its length
/// into `*len`, whether an ack must be read into `*awaits_reply`.
///
/// # Safety
///
/// As the callers'.
unsafe fn send(
    ch: *mut vhu_channel,
    buf: *mut u8,
    cap: usize,
    len: *mut usize,
    awaits_reply: *mut bool,
    encode: impl FnOnce(&mut Channel, &mut [u8]) -> Result<Sent, ChannelError>,
) -> vhu_result {
    guard(|| {
        let mut fp = Footprint::new();
        // SAFETY: the caller's contract.
        unsafe { fp.state::<Channel, _>(ch) }?;
        fp.writes(buf, cap)?;
        fp.writes(len, 1)?;
        fp.writes(awaits_reply, 1)?;
        // SAFETY: the caller's contract.
        unsafe { state::put(len, 0) }?;
        // SAFETY: the caller's contract.
        unsafe { state::put(awaits_reply, false) }?;
        // SAFETY: the caller's contract.
        let mut c = unsafe { state::get::<Channel, _>(ch) }?;
        // SAFETY: the caller's contract; apart from the rest (claimed).
        let out = unsafe { state::bytes_mut(buf, cap) }?;
        let sent = encode(&mut c, out).map_err(channel_error)?;
        // SAFETY: the caller's contract.
        unsafe { state::put(len, sent.len) }?;
        // SAFETY: the caller's contract.
        unsafe { state::put(awaits_reply, sent.awaits_reply) }
    })
}

/// CONFIG_CHANGE_MSG (CONFIG negotiated): the device's config space
/// changed. The message goes into `buf` (`cap` bytes, `*len` of them);
/// `*awaits_reply`: read the ack and give it to `vhu_channel_reply()`
/// before the next request. `VHU_ERR_NOT_NEGOTIATED` without CONFIG,
/// `VHU_ERR_BUSY` while an ack is awaited, `VHU_ERR_SHORT_BUFFER`.
///
/// # Safety
///
/// `ch` points at a channel; `buf` at `cap` writable bytes; `len` and
/// `awaits_reply` at a writable `size_t` and `bool`.
#[no_mangle]
pub unsafe extern "C" fn vhu_channel_config_change(
    ch: *mut vhu_channel,
    buf: *mut u8,
    cap: usize,
    len: *mut usize,
    awaits_reply: *mut bool,
) -> vhu_result {
    // SAFETY: the caller's contract.
    unsafe {
        send(ch, buf, cap, len, awaits_reply, |c, out| {
            c.config_change(out)
        })
    }
}

/// BACKEND_VRING_CALL for ring `queue` (INBAND_NOTIFICATIONS negotiated):
/// as `vhu_channel_config_change()`; the ack always comes (REPLY_ACK goes
/// with in-band notifications).
///
/// # Safety
///
/// As `vhu_channel_config_change()`.
#[no_mangle]
pub unsafe extern "C" fn vhu_channel_vring_call(
    ch: *mut vhu_channel,
    queue: u16,
    buf: *mut u8,
    cap: usize,
    len: *mut usize,
    awaits_reply: *mut bool,
) -> vhu_result {
    // SAFETY: the caller's contract.
    unsafe {
        send(ch, buf, cap, len, awaits_reply, |c, out| {
            c.vring_call(queue, out)
        })
    }
}

/// BACKEND_VRING_ERR for ring `queue`: as `vhu_channel_vring_call()`.
///
/// # Safety
///
/// As `vhu_channel_config_change()`.
#[no_mangle]
pub unsafe extern "C" fn vhu_channel_vring_err(
    ch: *mut vhu_channel,
    queue: u16,
    buf: *mut u8,
    cap: usize,
    len: *mut usize,
    awaits_reply: *mut bool,
) -> vhu_result {
    // SAFETY: the caller's contract.
    unsafe {
        send(ch, buf, cap, len, awaits_reply, |c, out| {
            c.vring_err(queue, out)
        })
    }
}

/// Checks the front-end's reply to the awaited request: `len` bytes at
/// `msg` (header and payload, one whole message) that came with `nfds`
/// fds (the caller closes them). The channel is free again whatever the
/// outcome: `VHU_OK` (the front-end took the request), `VHU_ERR_NACK` (it
/// failed it), `VHU_ERR_PROTOCOL` (no ack was awaited), `VHU_ERR_WIRE`,
/// `VHU_ERR_SHORT_BUFFER` or `VHU_ERR_INVALID` (a malformed reply, one to
/// another request, or not exactly one message: end the connection).
///
/// # Safety
///
/// `ch` points at a channel; `msg` at `len` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn vhu_channel_reply(
    ch: *mut vhu_channel,
    msg: *const u8,
    len: usize,
    nfds: usize,
) -> vhu_result {
    guard(|| {
        let mut fp = Footprint::new();
        // SAFETY: the caller's contract.
        unsafe { fp.state::<Channel, _>(ch) }?;
        fp.reads(msg, len)?;
        // SAFETY: the caller's contract.
        let mut c = unsafe { state::get::<Channel, _>(ch) }?;
        // SAFETY: the caller's contract.
        let bytes = unsafe { state::slice(msg, len) }?;
        let (header, payload) = match whole_message(bytes) {
            Ok(m) => m,
            Err(e) => {
                // The awaited ack is void either way: the connection ends.
                c.abandon();
                return Err(e);
            }
        };
        c.reply(&header, payload, nfds).map_err(channel_error)
    })
}

/// Gives up on the awaited ack (the front-end did not answer in time: end
/// the connection). Nothing is awaited afterwards.
///
/// # Safety
///
/// `ch` points at a channel.
#[no_mangle]
pub unsafe extern "C" fn vhu_channel_abandon(ch: *mut vhu_channel) -> vhu_result {
    guard(|| {
        let mut fp = Footprint::new();
        // SAFETY: the caller's contract.
        unsafe { fp.state::<Channel, _>(ch) }?;
        // SAFETY: the caller's contract.
        let mut c = unsafe { state::get::<Channel, _>(ch) }?;
        c.abandon();
        Ok(())
    })
}
