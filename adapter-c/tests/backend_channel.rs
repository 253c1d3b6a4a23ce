//! The back-end channel of a C front-end: `vhu_frontend_serve_backend()`
//! on a front-end engine of the ABI that a scripted back-end took through
//! the handshake. Each request kind gives its notice and, when asked, the
//! ack the spec describes (a reply header, a u64: 0 served, non-zero
//! refused); each bad input gives its error code and leaves nothing to
//! send.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use core::ptr;

use vhost_user_c::backend::*;
use vhost_user_c::frontend::*;
use vhost_user_c::memory::vhu_mem_region;
use vhost_user_c::vhu_result::{self, *};

const VA: u64 = 0x7000_0000;

/// Header flags: version 1, REPLY, NEED_REPLY.
const VERSION: u32 = 0x1;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;

/// Back-end request codes.
const CONFIG_CHANGE_MSG: u32 = 2;
const VRING_HOST_NOTIFIER_MSG: u32 = 3;
const VRING_CALL: u32 = 4;
const VRING_ERR: u32 = 5;
const SHARED_OBJECT_ADD: u32 = 6;

/// Front-end request codes the scripted back-end answers with a value.
const GET_FEATURES: u32 = 1;
const GET_PROTOCOL_FEATURES: u32 = 15;
const GET_QUEUE_NUM: u32 = 17;

/// Zeroed storage of `size` bytes aligned to 64, and room after it.
struct Storage(Vec<u64>);

impl Storage {
    fn new(size: usize) -> Storage {
        Storage(vec![0u64; size / 8 + 16])
    }
    fn at<T>(&mut self) -> *mut T {
        let base = self.0.as_mut_ptr().cast::<u8>();
        base.wrapping_add(base.align_offset(64)).cast()
    }
}

fn check(r: vhu_result, what: &str) {
    assert_eq!(r, VHU_OK, "{what}");
}

/// A message: header (request, flags, size) and payload.
fn message(request: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&request.to_le_bytes());
    m.extend_from_slice(&flags.to_le_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    m.extend_from_slice(payload);
    m
}

/// A vhost_vring_state payload for ring `index`.
fn ring(index: u32) -> [u8; 8] {
    let mut p = [0u8; 8];
    p[..4].copy_from_slice(&index.to_le_bytes());
    p
}

/// The ack the spec describes: a reply to `request` (flags: REPLY and
/// version 1, size 8) with the u64 `value`.
fn ack(request: u32, value: u64) -> Vec<u8> {
    message(request, REPLY | VERSION, &value.to_le_bytes())
}

/// A front-end engine of the ABI with two queues.
struct Engine {
    fe: Storage,
}

impl Engine {
    /// An engine that wants `wanted`, not yet through the handshake.
    fn new(wanted: u64) -> Engine {
        let mut e = Engine {
            fe: Storage::new(vhu_frontend_size()),
        };
        let q = vhu_queue_config {
            size: 64,
            addrs: vhu_ring_addrs {
                desc: VA + 0x1000,
                driver: VA + 0x2000,
                device: VA + 0x3000,
            },
            base: 0,
            kick_polling: 1,
            call_polling: 1,
        };
        let queues = [q, q];
        let regions = [vhu_mem_region {
            guest_addr: 0,
            size: 0x10000,
            user_addr: VA,
            mmap_offset: 0,
        }];
        let cfg = vhu_frontend_config {
            struct_size: size_of::<vhu_frontend_config>(),
            features: VHU_VIRTIO_F_VERSION_1 | VHU_F_PROTOCOL_FEATURES,
            protocol_features: wanted,
            queues: queues.as_ptr(),
            num_queues: queues.len(),
            regions: regions.as_ptr(),
            num_regions: regions.len(),
        };
        // SAFETY: the storage holds the engine's size; the config and its
        // arrays are live.
        check(
            unsafe { vhu_frontend_init(e.fe.at(), vhu_frontend_size(), &cfg) },
            "init",
        );
        e
    }

    /// An engine that wanted `wanted` and was offered `offered`, through
    /// the handshake: the protocol features negotiated.
    fn negotiated(wanted: u64, offered: u64) -> (Engine, u64) {
        let mut e = Engine::new(wanted);
        let negotiated = e.handshake(offered);
        assert_eq!(e.state(), vhu_frontend_state::VHU_FRONTEND_READY);
        (e, negotiated)
    }

    /// Answers every message the engine sends as a back-end offering
    /// `offered` (and two queues) would: the negotiated protocol features.
    fn handshake(&mut self, offered: u64) -> u64 {
        let mut buf = [0u8; VHU_FRONTEND_MAX_TRANSMIT as usize];
        let mut negotiated = None;
        loop {
            let mut tx = core::mem::MaybeUninit::new(vhu_transmit::default());
            // SAFETY: live engine and buffers.
            let r = unsafe {
                vhu_frontend_poll_transmit(
                    self.fe.at(),
                    buf.as_mut_ptr(),
                    buf.len(),
                    tx.as_mut_ptr(),
                )
            };
            check(r, "transmit");
            // SAFETY: written by the call.
            let tx = unsafe { tx.assume_init() };
            while let Some(ev) = self.event() {
                if ev.kind == vhu_event_kind::VHU_EVENT_NEGOTIATED {
                    negotiated = Some(ev.protocol_features);
                }
            }
            if tx.len == 0 {
                return negotiated.expect("VHU_EVENT_NEGOTIATED");
            }
            if !tx.awaits_reply {
                continue;
            }
            let value = match tx.request {
                GET_FEATURES => VHU_VIRTIO_F_VERSION_1 | VHU_F_PROTOCOL_FEATURES,
                GET_PROTOCOL_FEATURES => offered,
                GET_QUEUE_NUM => 2,
                _ => 0,
            };
            let reply = ack(tx.request, value);
            // SAFETY: live engine; the reply is live for its length.
            let r =
                unsafe { vhu_frontend_handle_reply(self.fe.at(), reply.as_ptr(), reply.len(), 0) };
            check(r, "reply");
        }
    }

    fn event(&mut self) -> Option<vhu_event> {
        let mut ev = core::mem::MaybeUninit::new(vhu_event::default());
        // SAFETY: live engine and out-value.
        check(
            unsafe { vhu_frontend_poll_event(self.fe.at(), ev.as_mut_ptr()) },
            "event",
        );
        // SAFETY: written by the call.
        let ev = unsafe { ev.assume_init() };
        (ev.kind != vhu_event_kind::VHU_EVENT_NONE).then_some(ev)
    }

    fn state(&mut self) -> vhu_frontend_state {
        let mut s = vhu_frontend_state::VHU_FRONTEND_FAILED;
        // SAFETY: live engine and out-value.
        check(
            unsafe { vhu_frontend_get_state(self.fe.at(), &mut s, ptr::null_mut()) },
            "state",
        );
        s
    }

    /// `vhu_frontend_serve_backend` of `msg` (`nfds` fds with it) with an
    /// ack buffer of `cap` bytes: the result, the notice, and the ack
    /// (the first `ack_len` bytes; the buffer is checked untouched past
    /// them).
    fn serve(&mut self, msg: &[u8], nfds: usize, cap: usize) -> (vhu_result, Served) {
        let mut buf = vec![0xeeu8; cap];
        // Values no call writes, so that one the call leaves shows.
        let mut out = vhu_backend_notice {
            kind: vhu_notice_kind::VHU_NOTICE_OTHER,
            queue: u16::MAX,
            request: u32::MAX,
            ack_len: usize::MAX,
            ..Default::default()
        };
        // SAFETY: live engine; `msg` and `buf` are live for their
        // lengths; live out-value.
        let r = unsafe {
            vhu_frontend_serve_backend(
                self.fe.at(),
                msg.as_ptr(),
                msg.len(),
                nfds,
                buf.as_mut_ptr(),
                buf.len(),
                &mut out,
            )
        };
        assert!(out.ack_len <= cap, "{out:?}");
        let n = out.ack_len;
        assert!(buf[n..].iter().all(|&b| b == 0xee), "written past the ack");
        buf.truncate(n);
        (r, Served { out, ack: buf })
    }
}

/// What one serve gave.
#[derive(Debug)]
struct Served {
    out: vhu_backend_notice,
    ack: Vec<u8>,
}

impl Served {
    fn is(&self, kind: vhu_notice_kind, queue: u16, request: u32) {
        assert_eq!(
            (self.out.kind, self.out.queue, self.out.request),
            (kind, queue, request),
            "{self:?}"
        );
    }

    /// What an error leaves: no notice and nothing to send.
    fn is_nothing(&self) {
        self.is(vhu_notice_kind::VHU_NOTICE_NONE, 0, 0);
        assert_eq!(self.out.ack_len, 0);
    }
}

/// Everything a back-end channel carries, negotiated.
const ALL: u64 = VHU_PROTOCOL_F_MQ
    | VHU_PROTOCOL_F_REPLY_ACK
    | VHU_PROTOCOL_F_CONFIG
    | VHU_PROTOCOL_F_BACKEND_REQ
    | VHU_PROTOCOL_F_INBAND_NOTIFICATIONS;

fn all() -> Engine {
    let (e, negotiated) = Engine::negotiated(ALL, ALL);
    assert_eq!(negotiated, ALL);
    e
}

const CAP: usize = VHU_FRONTEND_MAX_ACK as usize;

#[test]
fn each_notice_with_the_ack_asked_for() {
    let mut e = all();
    use vhu_notice_kind::*;

    let (r, s) = e.serve(
        &message(CONFIG_CHANGE_MSG, VERSION | NEED_REPLY, &[]),
        0,
        CAP,
    );
    assert_eq!(r, VHU_OK);
    s.is(VHU_NOTICE_CONFIG_CHANGED, 0, CONFIG_CHANGE_MSG);
    assert_eq!(s.ack, ack(CONFIG_CHANGE_MSG, 0));
    // The ack's bytes, spelled out: request 2, flags REPLY | version 1,
    // size 8, the u64 0.
    assert_eq!(
        s.ack,
        [2, 0, 0, 0, 0x5, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    );

    let (r, s) = e.serve(&message(VRING_CALL, VERSION | NEED_REPLY, &ring(1)), 0, CAP);
    assert_eq!(r, VHU_OK);
    s.is(VHU_NOTICE_CALL, 1, VRING_CALL);
    assert_eq!(s.ack, ack(VRING_CALL, 0));

    let (r, s) = e.serve(&message(VRING_ERR, VERSION | NEED_REPLY, &ring(0)), 0, CAP);
    assert_eq!(r, VHU_OK);
    s.is(VHU_NOTICE_RING_ERROR, 0, VRING_ERR);
    assert_eq!(s.ack, ack(VRING_ERR, 0));

    // Nothing of the engine changed: it still starts.
    assert_eq!(e.state(), vhu_frontend_state::VHU_FRONTEND_READY);
    // SAFETY: live engine.
    check(unsafe { vhu_frontend_start(e.fe.at()) }, "start");
}

#[test]
fn without_need_reply_there_is_no_ack() {
    let mut e = all();
    use vhu_notice_kind::*;
    let (r, s) = e.serve(&message(CONFIG_CHANGE_MSG, VERSION, &[]), 0, CAP);
    assert_eq!(r, VHU_OK);
    s.is(VHU_NOTICE_CONFIG_CHANGED, 0, CONFIG_CHANGE_MSG);
    assert!(s.ack.is_empty());
    let (r, s) = e.serve(&message(VRING_CALL, VERSION, &ring(1)), 0, CAP);
    assert_eq!(r, VHU_OK);
    s.is(VHU_NOTICE_CALL, 1, VRING_CALL);
    assert!(s.ack.is_empty());
    // A refusal unasked: nothing to send either.
    let (r, s) = e.serve(&message(SHARED_OBJECT_ADD, VERSION, &[7; 16]), 0, CAP);
    assert_eq!(r, VHU_OK);
    s.is(VHU_NOTICE_REFUSED, 0, SHARED_OBJECT_ADD);
    assert!(s.ack.is_empty());
    // And with nothing to write, no ack buffer is needed.
    let (r, s) = e.serve(&message(VRING_ERR, VERSION, &ring(0)), 0, 0);
    assert_eq!(r, VHU_OK);
    s.is(VHU_NOTICE_RING_ERROR, 0, VRING_ERR);
}

#[test]
fn a_request_not_served_is_refused_with_a_failed_ack() {
    let mut e = all();
    use vhu_notice_kind::*;
    // Not implemented: shared objects, host notifiers (with their fd).
    let (r, s) = e.serve(
        &message(SHARED_OBJECT_ADD, VERSION | NEED_REPLY, &[7; 16]),
        0,
        CAP,
    );
    assert_eq!(r, VHU_OK);
    s.is(VHU_NOTICE_REFUSED, 0, SHARED_OBJECT_ADD);
    assert_eq!(s.ack, ack(SHARED_OBJECT_ADD, 1));
    let area = [0u8; 24];
    let (r, s) = e.serve(
        &message(VRING_HOST_NOTIFIER_MSG, VERSION | NEED_REPLY, &area),
        1,
        CAP,
    );
    assert_eq!(r, VHU_OK);
    s.is(VHU_NOTICE_REFUSED, 0, VRING_HOST_NOTIFIER_MSG);
    assert_eq!(s.ack, ack(VRING_HOST_NOTIFIER_MSG, 1));

    // Not negotiated: CONFIG_CHANGE_MSG without CONFIG, in-band calls
    // without INBAND_NOTIFICATIONS.
    let some = VHU_PROTOCOL_F_MQ | VHU_PROTOCOL_F_REPLY_ACK | VHU_PROTOCOL_F_BACKEND_REQ;
    let (mut e, negotiated) = Engine::negotiated(ALL, some);
    assert_eq!(negotiated, some);
    let (r, s) = e.serve(
        &message(CONFIG_CHANGE_MSG, VERSION | NEED_REPLY, &[]),
        0,
        CAP,
    );
    assert_eq!(r, VHU_OK);
    s.is(VHU_NOTICE_REFUSED, 0, CONFIG_CHANGE_MSG);
    assert_eq!(
        s.ack,
        [2, 0, 0, 0, 0x5, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]
    );
    let (r, s) = e.serve(&message(VRING_CALL, VERSION | NEED_REPLY, &ring(0)), 0, CAP);
    assert_eq!(r, VHU_OK);
    s.is(VHU_NOTICE_REFUSED, 0, VRING_CALL);
    assert_eq!(s.ack, ack(VRING_CALL, 1));
}

#[test]
fn without_reply_ack_need_reply_gets_no_ack() {
    // (INBAND_NOTIFICATIONS needs REPLY_ACK: it goes too.)
    let wanted = ALL & !VHU_PROTOCOL_F_REPLY_ACK;
    let (mut e, negotiated) = Engine::negotiated(wanted, ALL);
    assert_eq!(
        negotiated,
        VHU_PROTOCOL_F_MQ | VHU_PROTOCOL_F_CONFIG | VHU_PROTOCOL_F_BACKEND_REQ
    );
    let (r, s) = e.serve(
        &message(CONFIG_CHANGE_MSG, VERSION | NEED_REPLY, &[]),
        0,
        CAP,
    );
    assert_eq!(r, VHU_OK);
    s.is(
        vhu_notice_kind::VHU_NOTICE_CONFIG_CHANGED,
        0,
        CONFIG_CHANGE_MSG,
    );
    assert!(s.ack.is_empty());
}

#[test]
fn only_a_negotiated_session_with_a_channel_serves() {
    let config_change = message(CONFIG_CHANGE_MSG, VERSION | NEED_REPLY, &[]);
    // Before the handshake ends: not now.
    let mut e = Engine::new(ALL);
    let (r, s) = e.serve(&config_change, 0, CAP);
    assert_eq!(r, VHU_ERR_BUSY);
    s.is_nothing();
    // Once negotiated, the same request is served.
    assert_eq!(e.handshake(ALL), ALL);
    let (r, s) = e.serve(&config_change, 0, CAP);
    assert_eq!(r, VHU_OK);
    s.is(
        vhu_notice_kind::VHU_NOTICE_CONFIG_CHANGED,
        0,
        CONFIG_CHANGE_MSG,
    );

    // BACKEND_REQ not negotiated (the back-end did not offer it): no
    // channel was sent, nothing comes on one.
    let no_channel = ALL & !VHU_PROTOCOL_F_BACKEND_REQ & !VHU_PROTOCOL_F_INBAND_NOTIFICATIONS;
    let (mut e, negotiated) = Engine::negotiated(ALL, no_channel);
    assert_eq!(negotiated, no_channel);
    let (r, s) = e.serve(&config_change, 0, CAP);
    assert_eq!(r, VHU_ERR_NOT_NEGOTIATED);
    s.is_nothing();

    // An engine that failed (a reply it refused): the connection ends.
    let mut e = all();
    // SAFETY: live engine.
    check(unsafe { vhu_frontend_start(e.fe.at()) }, "start");
    let mut buf = [0u8; VHU_FRONTEND_MAX_TRANSMIT as usize];
    // The start's first message that awaits a reply (SET_FEATURES goes
    // out without one).
    let tx = loop {
        let mut tx = core::mem::MaybeUninit::new(vhu_transmit::default());
        // SAFETY: live engine and buffers.
        let r = unsafe {
            vhu_frontend_poll_transmit(e.fe.at(), buf.as_mut_ptr(), buf.len(), tx.as_mut_ptr())
        };
        check(r, "transmit");
        // SAFETY: written by the call.
        let tx = unsafe { tx.assume_init() };
        assert_ne!(tx.len, 0, "the start awaits a reply at some point");
        while e.event().is_some() {}
        if tx.awaits_reply {
            break tx;
        }
    };
    let wrong = ack(tx.request + 1, 0);
    // SAFETY: live engine and reply.
    let r = unsafe { vhu_frontend_handle_reply(e.fe.at(), wrong.as_ptr(), wrong.len(), 0) };
    assert_ne!(r, VHU_OK);
    assert_eq!(e.state(), vhu_frontend_state::VHU_FRONTEND_FAILED);
    let (r, s) = e.serve(&config_change, 0, CAP);
    assert_eq!(r, VHU_ERR_FAILED);
    s.is_nothing();

    // Storage that holds no front-end.
    let mut other = Storage::new(vhu_frontend_size());
    let mut out = vhu_backend_notice {
        kind: vhu_notice_kind::VHU_NOTICE_OTHER,
        queue: 9,
        request: 9,
        ack_len: 9,
        ..Default::default()
    };
    let mut a = [0u8; CAP];
    // SAFETY: zeroed storage of the engine's size; live buffers.
    let r = unsafe {
        vhu_frontend_serve_backend(
            other.at(),
            config_change.as_ptr(),
            config_change.len(),
            0,
            a.as_mut_ptr(),
            a.len(),
            &mut out,
        )
    };
    assert_eq!(r, VHU_ERR_STATE);
    assert_eq!(out.kind, vhu_notice_kind::VHU_NOTICE_NONE);
    assert_eq!(out.ack_len, 0);
}

#[test]
fn null_pointers_are_refused() {
    let mut e = all();
    let msg = message(CONFIG_CHANGE_MSG, VERSION | NEED_REPLY, &[]);
    let mut a = [0u8; CAP];
    let mut out = vhu_backend_notice {
        kind: vhu_notice_kind::VHU_NOTICE_OTHER,
        queue: 9,
        request: 9,
        ack_len: 9,
        ..Default::default()
    };
    let fe: *mut vhu_frontend = e.fe.at();
    // SAFETY: each call: a live engine or NULL, live buffers or NULL.
    unsafe {
        let r = vhu_frontend_serve_backend(
            ptr::null_mut(),
            msg.as_ptr(),
            msg.len(),
            0,
            a.as_mut_ptr(),
            a.len(),
            &mut out,
        );
        assert_eq!(r, VHU_ERR_NULL);
        assert_eq!(out.kind, vhu_notice_kind::VHU_NOTICE_NONE);
        let r = vhu_frontend_serve_backend(
            fe,
            ptr::null(),
            msg.len(),
            0,
            a.as_mut_ptr(),
            a.len(),
            &mut out,
        );
        assert_eq!(r, VHU_ERR_NULL);
        let r = vhu_frontend_serve_backend(
            fe,
            msg.as_ptr(),
            msg.len(),
            0,
            a.as_mut_ptr(),
            a.len(),
            ptr::null_mut(),
        );
        assert_eq!(r, VHU_ERR_NULL);
        // An ack due and no buffer for it.
        let r = vhu_frontend_serve_backend(
            fe,
            msg.as_ptr(),
            msg.len(),
            0,
            ptr::null_mut(),
            a.len(),
            &mut out,
        );
        assert_eq!(r, VHU_ERR_NULL);
        assert_eq!(out.ack_len, 0);
        // And the engine serves still.
        let r = vhu_frontend_serve_backend(
            fe,
            msg.as_ptr(),
            msg.len(),
            0,
            a.as_mut_ptr(),
            a.len(),
            &mut out,
        );
        assert_eq!(r, VHU_OK);
        assert_eq!(out.ack_len, CAP);
    }
}

#[test]
fn lengths_that_disagree_with_the_header_are_refused() {
    let mut e = all();
    let call = message(VRING_CALL, VERSION | NEED_REPLY, &ring(1));
    // Shorter than a header.
    let (r, s) = e.serve(&call[..11], 0, CAP);
    assert_eq!(r, VHU_ERR_SHORT_BUFFER);
    s.is_nothing();
    let (r, s) = e.serve(&[], 0, CAP);
    assert_eq!(r, VHU_ERR_SHORT_BUFFER);
    s.is_nothing();
    // Shorter than the header's size says (a header alone, a payload cut).
    let (r, s) = e.serve(&call[..12], 0, CAP);
    assert_eq!(r, VHU_ERR_SHORT_BUFFER);
    s.is_nothing();
    let (r, s) = e.serve(&call[..19], 0, CAP);
    assert_eq!(r, VHU_ERR_SHORT_BUFFER);
    s.is_nothing();
    // Longer: the bytes of the next message with it.
    let mut two = call.clone();
    two.extend_from_slice(&message(CONFIG_CHANGE_MSG, VERSION, &[]));
    let (r, s) = e.serve(&two, 0, CAP);
    assert_eq!(r, VHU_ERR_INVALID);
    s.is_nothing();
    let (r, s) = e.serve(&[&call[..], &[0]].concat(), 0, CAP);
    assert_eq!(r, VHU_ERR_INVALID);
    s.is_nothing();
    // An ack buffer too short for the ack asked for.
    let (r, s) = e.serve(&call, 0, CAP - 1);
    assert_eq!(r, VHU_ERR_SHORT_BUFFER);
    s.is_nothing();
    // The whole message, exactly: served.
    let (r, s) = e.serve(&call, 0, CAP);
    assert_eq!(r, VHU_OK);
    s.is(vhu_notice_kind::VHU_NOTICE_CALL, 1, VRING_CALL);
    assert_eq!(s.ack, ack(VRING_CALL, 0));
}

#[test]
fn malformed_requests_are_wire_errors() {
    let mut e = all();
    let bad: [(&str, Vec<u8>, usize); 9] = [
        ("version 0", message(CONFIG_CHANGE_MSG, 0, &[]), 0),
        (
            "reserved flag",
            message(CONFIG_CHANGE_MSG, VERSION | 0x100, &[]),
            0,
        ),
        (
            "a reply",
            message(CONFIG_CHANGE_MSG, VERSION | REPLY, &[]),
            0,
        ),
        ("unknown request", message(999, VERSION, &[]), 0),
        (
            "payload where none goes",
            message(CONFIG_CHANGE_MSG, VERSION, &[0; 8]),
            0,
        ),
        (
            "a short ring payload",
            message(VRING_CALL, VERSION, &[1, 0, 0, 0]),
            0,
        ),
        (
            "a ring past the queues",
            message(VRING_CALL, VERSION, &ring(2)),
            0,
        ),
        (
            "an fd where none goes",
            message(VRING_ERR, VERSION, &ring(0)),
            1,
        ),
        (
            "no fd where one goes",
            message(VRING_HOST_NOTIFIER_MSG, VERSION, &[0; 24]),
            0,
        ),
    ];
    for (what, msg, nfds) in bad {
        let (r, s) = e.serve(&msg, nfds, CAP);
        assert_eq!(r, VHU_ERR_WIRE, "{what}");
        s.is_nothing();
    }
    // A size above any message's.
    let mut huge = message(CONFIG_CHANGE_MSG, VERSION, &[]);
    huge[8..12].copy_from_slice(&0x10_0000u32.to_le_bytes());
    let (r, s) = e.serve(&huge, 0, CAP);
    assert_eq!(r, VHU_ERR_WIRE);
    s.is_nothing();
}

/// The request is read while the ack is written: an ack or output over
/// the request, over each other or over the engine is refused before
/// anything is written, and so is a request inside the engine; buffers
/// that end where another begins are taken.
#[test]
fn overlapping_buffers_are_refused() {
    let mut e = all();
    let call = message(VRING_CALL, VERSION | NEED_REPLY, &ring(1));
    let fe: *mut vhu_frontend = e.fe.at();
    // One buffer holds the request, then the ack, then the output.
    let mut mem = vec![0u64; 32];
    let base = mem.as_mut_ptr().cast::<u8>();
    let notice_at = 64usize;
    let serve = |msg_at: usize, ack_at: usize, out_at: usize| -> vhu_result {
        // SAFETY: every offset and length used below stays inside the
        // 256 bytes of `mem`; `out_at` is 8-aligned.
        unsafe {
            // The output's size, then the request (which may cover the
            // output past its size).
            let out_size = size_of::<vhu_backend_notice>();
            base.add(out_at).cast::<usize>().write(out_size);
            ptr::copy_nonoverlapping(call.as_ptr(), base.add(msg_at), call.len());
            vhu_frontend_serve_backend(
                fe,
                base.add(msg_at),
                call.len(),
                0,
                base.add(ack_at),
                CAP,
                base.add(out_at).cast(),
            )
        }
    };
    let len = call.len();
    assert_eq!(len, 20);
    // The ack over the request's last byte; over the request entirely.
    assert_eq!(serve(0, len - 1, 128), VHU_ERR_INVALID);
    assert_eq!(serve(0, 0, 128), VHU_ERR_INVALID);
    // The output over the ack, over the request.
    assert_eq!(serve(0, 32, 48), VHU_ERR_INVALID);
    assert_eq!(serve(8, 32, 0), VHU_ERR_INVALID);
    // Apart, end to end: served.
    assert_eq!(serve(0, len, notice_at), VHU_OK);
    // SAFETY: written by the successful call.
    let out = unsafe { base.add(notice_at).cast::<vhu_backend_notice>().read() };
    assert_eq!(out.kind, vhu_notice_kind::VHU_NOTICE_CALL);
    assert_eq!(out.ack_len, CAP);
    // SAFETY: the ack's bytes, inside `mem`.
    let written = unsafe { core::slice::from_raw_parts(base.add(len), CAP) };
    assert_eq!(written, ack(VRING_CALL, 0));

    // The ack, the output or the request inside the engine's storage.
    let mut a = [0u8; CAP];
    let mut out = vhu_backend_notice {
        kind: vhu_notice_kind::VHU_NOTICE_OTHER,
        queue: 9,
        request: 9,
        ack_len: 9,
        ..Default::default()
    };
    let size = vhu_frontend_size();
    let inside = fe.cast::<u8>().wrapping_add(size - 24);
    // SAFETY: each pointer is live for its length (the engine's storage
    // for the ones inside it); the calls refuse before writing.
    unsafe {
        let r = vhu_frontend_serve_backend(fe, call.as_ptr(), len, 0, inside, CAP, &mut out);
        assert_eq!(r, VHU_ERR_INVALID);
        let r = vhu_frontend_serve_backend(
            fe,
            call.as_ptr(),
            len,
            0,
            a.as_mut_ptr(),
            CAP,
            inside.cast(),
        );
        assert_eq!(r, VHU_ERR_INVALID);
        let r = vhu_frontend_serve_backend(fe, inside, len, 0, a.as_mut_ptr(), CAP, &mut out);
        assert_eq!(r, VHU_ERR_INVALID);
    }
    // The engine is untouched and serves.
    let (r, s) = e.serve(&call, 0, CAP);
    assert_eq!(r, VHU_OK);
    s.is(vhu_notice_kind::VHU_NOTICE_CALL, 1, VRING_CALL);
}
