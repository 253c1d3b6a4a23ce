//! virtio-net's two messages through the C ABI: SEND_RARP reaches the
//! device's `send_rarp` with the guest's MAC, NET_SET_MTU its `set_mtu`
//! (whose answer is the REPLY_ACK), and a device without the callbacks is
//! neither offered the features nor handed the messages, as the Rust
//! runtime's session does it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use core::ffi::c_void;
use core::ptr;

use vhost_user_c::backend::*;
use vhost_user_c::vhu_result::{self, *};

use vhost_user_core::backend::{BackendConfig, BackendError, Reply, Session};
use vhost_user_core::dataplane::Token;
use vhost_user_core::device::{Completion, Device};
use vhost_user_core::feature::{ProtocolFeatures, VirtioFeatures};
use vhost_user_core::memory::{GuestMemory, MemoryError};
use vhost_user_core::message::{ConfigWriteKind, Header, HEADER_SIZE};
use vhost_user_core::vring::Chain;

const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const SEND_RARP: u32 = 19;
const NET_SET_MTU: u32 = 20;
/// Version 1.
const FLAGS: u32 = 0x1;
/// Version 1, NEED_REPLY.
const NEED_REPLY: u32 = 0x1 | 0x8;
/// Version 1, a reply.
const REPLY: u32 = 0x1 | 0x4;

/// A message: header and a u64 payload.
fn msg(request: u32, flags: u32, value: u64) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&request.to_le_bytes());
    m.extend_from_slice(&flags.to_le_bytes());
    m.extend_from_slice(&8u32.to_le_bytes());
    m.extend_from_slice(&value.to_le_bytes());
    m
}

/// A message without a payload.
fn bare(request: u32) -> Vec<u8> {
    let mut m = msg(request, FLAGS, 0);
    m[8..12].copy_from_slice(&0u32.to_le_bytes());
    m.truncate(HEADER_SIZE);
    m
}

/// The u64 of a reply to `request`, checking its header.
fn reply_u64(request: u32, reply: &[u8]) -> u64 {
    assert_eq!(reply.len(), HEADER_SIZE + 8, "reply {reply:?}");
    assert_eq!(reply[0..4], request.to_le_bytes());
    assert_eq!(reply[4..8], REPLY.to_le_bytes());
    assert_eq!(reply[8..12], 8u32.to_le_bytes());
    u64::from_le_bytes(reply[12..20].try_into().unwrap())
}

/// What the C device's callbacks saw, and what `set_mtu` takes.
#[derive(Default)]
struct Net {
    macs: Vec<[u8; 6]>,
    mtus: Vec<u16>,
    max_mtu: u16,
    rarp_ok: bool,
}

unsafe extern "C" fn set_mtu(ctx: *mut c_void, mtu: u16) -> bool {
    // SAFETY: `ctx` is the test's `Net`, not otherwise used during the call.
    let n = unsafe { &mut *ctx.cast::<Net>() };
    n.mtus.push(mtu);
    mtu <= n.max_mtu
}

unsafe extern "C" fn send_rarp(ctx: *mut c_void, mac: *const u8) -> bool {
    // SAFETY: as in `set_mtu`.
    let n = unsafe { &mut *ctx.cast::<Net>() };
    // SAFETY: the session hands 6 live bytes.
    let mac = unsafe { core::slice::from_raw_parts(mac, 6) };
    n.macs.push(mac.try_into().unwrap());
    n.rarp_ok
}

fn device(net: &mut Net, mtu: bool, rarp: bool) -> vhu_device {
    vhu_device {
        struct_size: size_of::<vhu_device>(),
        ctx: ptr::from_mut(net).cast(),
        read_config: None,
        write_config: None,
        features_acked: None,
        reset: None,
        set_mtu: if mtu { Some(set_mtu) } else { None },
        send_rarp: if rarp { Some(send_rarp) } else { None },
    }
}

/// A C back-end session in its storage.
struct Backend {
    storage: Vec<u64>,
}

impl Backend {
    /// A session offering REPLY_ACK and `protocol`: `vhu_backend_init`'s
    /// result and the session.
    fn new(protocol: u64) -> (vhu_result, Backend) {
        let mut b = Backend {
            storage: vec![0u64; vhu_backend_size() / 8 + 1],
        };
        let cfg = vhu_backend_config {
            struct_size: size_of::<vhu_backend_config>(),
            features: VHU_VIRTIO_F_VERSION_1 | VHU_F_PROTOCOL_FEATURES,
            protocol_features: VHU_PROTOCOL_F_REPLY_ACK | protocol,
            num_queues: 2,
            max_queue_size: 256,
        };
        assert!(vhu_backend_align() <= 8);
        // SAFETY: storage of the session's size, aligned to 8; a live config.
        let r = unsafe { vhu_backend_init(b.be(), vhu_backend_size(), &cfg) };
        (r, b)
    }

    fn be(&mut self) -> *mut vhu_backend {
        self.storage.as_mut_ptr().cast()
    }

    /// `vhu_backend_handle` of `m` with `dev`: its result, the outcome
    /// and the reply's bytes (none unless READY).
    fn handle(&mut self, m: &[u8], dev: Option<&vhu_device>) -> (vhu_result, vhu_outcome, Vec<u8>) {
        let mut reply = vec![0u8; VHU_MAX_MESSAGE as usize];
        let mut out = vhu_outcome {
            reply: vhu_reply_kind::VHU_REPLY_NONE,
            reply_len: 0,
            queue: 0,
            actions: 0,
            refused: VHU_OK,
            ..Default::default()
        };
        let dev = dev.map_or(ptr::null(), ptr::from_ref);
        // SAFETY: a live session, message, device (or NULL), reply and
        // out-value, apart from each other.
        let r = unsafe {
            vhu_backend_handle(
                self.be(),
                m.as_ptr(),
                m.len(),
                0,
                ptr::null(),
                dev,
                reply.as_mut_ptr(),
                reply.len(),
                &mut out,
            )
        };
        let n = match out.reply {
            vhu_reply_kind::VHU_REPLY_READY => out.reply_len,
            _ => 0,
        };
        reply.truncate(n);
        (r, out, reply)
    }

    /// The handshake's protocol part: GET_PROTOCOL_FEATURES (its answer)
    /// and SET_PROTOCOL_FEATURES acking all of it.
    fn negotiate(&mut self, dev: Option<&vhu_device>) -> u64 {
        let (r, _, reply) = self.handle(&bare(GET_PROTOCOL_FEATURES), dev);
        assert_eq!(r, VHU_OK);
        let offered = reply_u64(GET_PROTOCOL_FEATURES, &reply);
        let (r, out, _) = self.handle(&msg(SET_PROTOCOL_FEATURES, FLAGS, offered), dev);
        assert_eq!((r, out.refused), (VHU_OK, VHU_OK));
        offered
    }
}

#[test]
fn send_rarp_reaches_the_device_with_the_guests_mac() {
    let mut net = Net {
        rarp_ok: true,
        ..Net::default()
    };
    let dev = device(&mut net, false, true);
    let (r, mut be) = Backend::new(VHU_PROTOCOL_F_RARP);
    assert_eq!(r, VHU_OK);
    let offered = be.negotiate(Some(&dev));
    assert_eq!(offered, VHU_PROTOCOL_F_REPLY_ACK | VHU_PROTOCOL_F_RARP);
    // The MAC is the first 6 bytes of the payload (QEMU's order), the
    // rest padding.
    let mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    let mut word = [0u8; 8];
    word[..6].copy_from_slice(&mac);
    let value = u64::from_le_bytes(word);
    // As QEMU sends it: no reply asked.
    let (r, out, reply) = be.handle(&msg(SEND_RARP, FLAGS, value), Some(&dev));
    assert_eq!(
        (r, out.reply, out.actions),
        (VHU_OK, vhu_reply_kind::VHU_REPLY_NONE, 0)
    );
    assert!(reply.is_empty());
    // With REPLY_ACK asked: acked.
    let (r, _, reply) = be.handle(
        &msg(SEND_RARP, NEED_REPLY, value | 0xffff << 48),
        Some(&dev),
    );
    assert_eq!(r, VHU_OK);
    assert_eq!(reply_u64(SEND_RARP, &reply), 0);
    // A device that refuses: a failed ack, or the connection ends.
    net.rarp_ok = false;
    let dev = device(&mut net, false, true);
    let (r, out, reply) = be.handle(&msg(SEND_RARP, NEED_REPLY, value), Some(&dev));
    assert_eq!((r, out.refused), (VHU_OK, VHU_ERR_REFUSED));
    assert_eq!(reply_u64(SEND_RARP, &reply), 1);
    let (r, _, _) = be.handle(&msg(SEND_RARP, FLAGS, value), Some(&dev));
    assert_eq!(r, VHU_ERR_REFUSED);
    assert_eq!(net.macs, [mac; 4]);
}

#[test]
fn net_set_mtu_is_acked_as_the_device_answers() {
    let mut net = Net {
        max_mtu: 9000,
        ..Net::default()
    };
    let dev = device(&mut net, true, false);
    let (r, mut be) = Backend::new(VHU_PROTOCOL_F_MTU);
    assert_eq!(r, VHU_OK);
    let offered = be.negotiate(Some(&dev));
    assert_eq!(offered, VHU_PROTOCOL_F_REPLY_ACK | VHU_PROTOCOL_F_MTU);
    let ack = |be: &mut Backend, mtu: u64| {
        let (r, out, reply) = be.handle(&msg(NET_SET_MTU, NEED_REPLY, mtu), Some(&dev));
        assert_eq!(r, VHU_OK, "MTU {mtu}");
        (reply_u64(NET_SET_MTU, &reply), out.refused)
    };
    // Taken by the device: acked.
    assert_eq!(ack(&mut be, 1500), (0, VHU_OK));
    assert_eq!(ack(&mut be, 68), (0, VHU_OK));
    assert_eq!(ack(&mut be, 9000), (0, VHU_OK));
    // Refused by the device: a failed ack.
    assert_eq!(ack(&mut be, 9001), (1, VHU_ERR_REFUSED));
    // Outside 68..=65535: refused before the device hears of it, with a
    // code of its own (not the device's refusal).
    for bad in [0, 67, 65536, 1 << 32 | 1500, u64::MAX] {
        assert_eq!(ack(&mut be, bad), (1, VHU_ERR_BAD_MTU), "MTU {bad}");
    }
    assert_eq!(net.mtus, [1500, 68, 9000, 9001]);
    // Without an ack asked, a refusal ends the connection.
    let dev = device(&mut net, true, false);
    let (r, _, _) = be.handle(&msg(NET_SET_MTU, FLAGS, 9001), Some(&dev));
    assert_eq!(r, VHU_ERR_REFUSED);
    let (r, _, _) = be.handle(&msg(NET_SET_MTU, FLAGS, 67), Some(&dev));
    assert_eq!(r, VHU_ERR_BAD_MTU);
    let (r, out, reply) = be.handle(&msg(NET_SET_MTU, FLAGS, 1280), Some(&dev));
    assert_eq!(
        (r, out.reply, reply.len()),
        (VHU_OK, vhu_reply_kind::VHU_REPLY_NONE, 0)
    );
    assert_eq!(net.mtus, [1500, 68, 9000, 9001, 9001, 1280]);
}

/// Guest memory with nothing mapped (no message here touches it).
struct NoMemory;

impl GuestMemory for NoMemory {
    fn read(&self, _: u64, _: &mut [u8]) -> Result<(), MemoryError> {
        Err(MemoryError::Unmapped)
    }
    fn write(&self, _: u64, _: &[u8]) -> Result<(), MemoryError> {
        Err(MemoryError::Unmapped)
    }
    fn load_u16_acquire(&self, _: u64) -> Result<u16, MemoryError> {
        Err(MemoryError::Unmapped)
    }
    fn store_u16_release(&self, _: u64, _: u16) -> Result<(), MemoryError> {
        Err(MemoryError::Unmapped)
    }
    fn fence(&self) {}
    fn check(&self, _: u64, _: u64) -> Result<(), MemoryError> {
        Err(MemoryError::Unmapped)
    }
}

/// A Rust device of the runtime without `set_mtu` or `send_rarp` (the
/// trait's defaults).
struct Plain;

impl Device for Plain {
    type Scratch = ();
    fn read_config(&self, _: u32, _: &mut [u8]) -> bool {
        false
    }
    fn write_config(&mut self, _: u32, _: &[u8], _: ConfigWriteKind) -> bool {
        false
    }
    fn process<M: GuestMemory + ?Sized, const S: usize>(
        &self,
        _: u16,
        _: &Chain<S>,
        _: Token,
        _: &M,
        _: &mut (),
    ) -> Completion {
        Completion::Done(0)
    }
}

/// The Rust runtime's session with the same configuration and `Plain`:
/// what `m` gets (the result as the C ABI names it, the refusal, the
/// reply's bytes). The runtime ends the connection on an error, and sends
/// the reply otherwise.
fn rust_session(s: &mut Session<16, 32>, m: &[u8]) -> (vhu_result, vhu_result, Vec<u8>) {
    let header = Header::parse(m).unwrap();
    let mut out = vec![0u8; VHU_MAX_MESSAGE as usize];
    match s.handle(
        &header,
        &m[HEADER_SIZE..],
        &0,
        &NoMemory,
        &mut Plain,
        &mut out,
    ) {
        Err(e) => (c_result(e), VHU_OK, Vec::new()),
        Ok(o) => {
            let n = match o.reply {
                Reply::Ready(n) => n,
                _ => 0,
            };
            let refused = o.refused.map_or(VHU_OK, c_result);
            (VHU_OK, refused, out[..n].to_vec())
        }
    }
}

/// The C ABI's class of the refusals met here.
fn c_result(e: BackendError) -> vhu_result {
    match e {
        BackendError::NotNegotiated(_) => VHU_ERR_NOT_NEGOTIATED,
        BackendError::Feature(_) => VHU_ERR_FEATURE,
        e => panic!("unexpected refusal: {e}"),
    }
}

#[test]
fn a_device_without_the_callbacks_is_not_offered_them() {
    let mut net = Net {
        max_mtu: u16::MAX,
        rarp_ok: true,
        ..Net::default()
    };
    // A configuration offering them, handled with a device lacking a
    // callback (or with none): refused before the session answers, so
    // no front-end hears of a message no callback takes.
    for (protocol, mtu, rarp) in [
        (VHU_PROTOCOL_F_RARP, true, false),
        (VHU_PROTOCOL_F_MTU, false, true),
        (VHU_PROTOCOL_F_RARP | VHU_PROTOCOL_F_MTU, true, false),
        (VHU_PROTOCOL_F_RARP | VHU_PROTOCOL_F_MTU, false, true),
    ] {
        let (r, mut be) = Backend::new(protocol);
        assert_eq!(r, VHU_OK, "init offering {protocol:#x}");
        let dev = device(&mut net, mtu, rarp);
        let get = bare(GET_PROTOCOL_FEATURES);
        for d in [Some(&dev), None] {
            let (r, out, reply) = be.handle(&get, d);
            assert_eq!(r, VHU_ERR_UNSUPPORTED, "offering {protocol:#x}");
            assert_eq!(
                (out.reply, out.actions, reply.len()),
                (vhu_reply_kind::VHU_REPLY_NONE, 0, 0)
            );
        }
        // With the callbacks, the same session answers.
        let full = device(&mut net, true, true);
        assert_eq!(
            be.negotiate(Some(&full)),
            VHU_PROTOCOL_F_REPLY_ACK | protocol
        );
    }
    assert!(net.mtus.is_empty() && net.macs.is_empty());

    // A device without them whose configuration leaves them out: not
    // offered, and a front-end that sends the messages anyway gets what
    // the Rust runtime gives it.
    let dev = device(&mut net, false, false);
    let (r, mut be) = Backend::new(0);
    assert_eq!(r, VHU_OK);
    let mut rust = Session::<16, 32>::new(BackendConfig {
        features: VirtioFeatures::VERSION_1 | VirtioFeatures::PROTOCOL_FEATURES,
        protocol_features: ProtocolFeatures::REPLY_ACK,
        num_queues: 2,
        max_queue_size: 256,
    })
    .unwrap();
    let both = VHU_PROTOCOL_F_RARP | VHU_PROTOCOL_F_MTU;
    let messages = [
        bare(GET_PROTOCOL_FEATURES),
        msg(SET_PROTOCOL_FEATURES, FLAGS, VHU_PROTOCOL_F_REPLY_ACK),
        // Acking them anyway: refused, as never offered.
        msg(
            SET_PROTOCOL_FEATURES,
            NEED_REPLY,
            VHU_PROTOCOL_F_REPLY_ACK | both,
        ),
        msg(SEND_RARP, NEED_REPLY, 0x5634_1200_5452),
        msg(NET_SET_MTU, NEED_REPLY, 1500),
        msg(SEND_RARP, FLAGS, 0x5634_1200_5452),
        msg(NET_SET_MTU, FLAGS, 1500),
    ];
    let mut got = Vec::new();
    for m in &messages {
        let (r, out, reply) = be.handle(m, Some(&dev));
        let c = (r, out.refused, reply);
        assert_eq!(c, rust_session(&mut rust, m), "message {}", m[0]);
        got.push(c);
    }
    assert_eq!(reply_u64(GET_PROTOCOL_FEATURES, &got[0].2) & both, 0);
    // SET_PROTOCOL_FEATURES with bits never offered: refused by the
    // session (a failed ack).
    assert_eq!(
        (got[2].1, reply_u64(SET_PROTOCOL_FEATURES, &got[2].2)),
        (VHU_ERR_FEATURE, 1)
    );
    assert_eq!(
        (got[3].1, reply_u64(SEND_RARP, &got[3].2)),
        (VHU_ERR_NOT_NEGOTIATED, 1)
    );
    assert_eq!(
        (got[4].1, reply_u64(NET_SET_MTU, &got[4].2)),
        (VHU_ERR_NOT_NEGOTIATED, 1)
    );
    // Without an ack asked, an error: the runtime ends the connection.
    assert_eq!(got[5].0, VHU_ERR_NOT_NEGOTIATED);
    assert_eq!(got[6].0, VHU_ERR_NOT_NEGOTIATED);
    assert!(net.mtus.is_empty() && net.macs.is_empty());
}
